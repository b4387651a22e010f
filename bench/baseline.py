"""The alternative users weigh: a hand-written asyncio script with AsyncOpenAI and a semaphore."""

from __future__ import annotations

import asyncio
import time

import openai


async def run_baseline(
    base_url: str, api_key: str, model: str, prompts: list[str], concurrency: int
) -> list[float]:
    """Returns each line's latency (s); raises if any line fails, as the script's author would notice."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)
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
