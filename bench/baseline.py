"""The alternative users weigh: a hand-written asyncio script with AsyncOpenAI and a semaphore."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx2
import openai


async def run_baseline(
    base_url: str, api_key: str, model: str, prompts: list[str], concurrency: int, aiohttp: bool = False
) -> list[float]:
    """Returns each line's latency (s); raises if any line fails, as the script's author would notice.
    The client keeps its default retries (2), as a script's author would leave them. `aiohttp`: the
    openai client's aiohttp backend (routerq's), a reference beside the default a script would use."""
    http_client = openai.DefaultAioHttpClient if aiohttp else openai.DefaultAsyncHttpxClient
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key=api_key,
        timeout=60,
        http_client=http_client(
            limits=httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        ),
    )
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(prompt: str) -> None:
        async with semaphore:
            started = time.perf_counter()
            answer = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}]
            )
            assert answer.choices[0].message.content
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(one(p) for p in prompts))
    await client.close()
    return latencies


def main() -> None:
    """Run the script on its own (the bench measures its process's CPU and memory from outside)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--lines", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--tag", default="baseline")
    parser.add_argument("--aiohttp", action="store_true", help="the openai client's aiohttp backend")
    args = parser.parse_args()
    prompts = [f"{args.tag} line {i}: say something" for i in range(args.lines)]
    started = time.perf_counter()
    latencies = asyncio.run(
        run_baseline(args.base_url, args.key, args.model, prompts, args.concurrency, args.aiohttp)
    )
    print(json.dumps({"seconds": time.perf_counter() - started, "lines": len(latencies)}))


if __name__ == "__main__":
    main()
