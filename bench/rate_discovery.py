"""Where rate limits bite: routerq's discovered rate against a hand-written asyncio script, on a fake
upstream that admits R requests of a model per rolling second and answers 429 (Retry-After: 1) beyond.

    python -m bench.rate_discovery                       # every scenario
    python -m bench.rate_discovery --only one-host       # one of: one-host two-hosts moving two-models flaky

Scenarios (3,000 lines unless said, 200 ms calls, --concurrency 64 per worker, default settings):
  one-host    R = 100/s; the script (AsyncOpenAI, default retries, semaphore of 64) then one worker.
              Floors: succeeded lines/s >= 1.2x the script's and >= 0.85 R after the first 10 s;
              refused calls (429) <= 5 % of calls.
  two-hosts   two `routerq worker` processes, one Redis, the same R: together >= 0.85 R, refused <= 5 %.
  moving      6,000 lines; R goes 100 -> 50 at 20 s and back to 100 at 40 s: seconds until routerq's
              succeeded calls per second are within 10 % of the new R (floor: 10 s each way).
  two-models  one batch over two models hidden at 100/s and 10/s (2,000 and 300 lines): each runs at
              >= 0.8 of its own limit while both run.
  flaky       no limit, but a provider that refuses 25 % of calls at random (429, Retry-After: 1):
              routerq with discovery on (the default) against routerq with it off and the script;
              discovery must not slow it down (>= 0.9x discovery off).
  queue       R = 100/s, and calls slow down as the limit nears (a provider's queue: +0.4 s at the
              limit, from half of it): the latency warning paces the model before upstream refuses.
Rates are read from the fake's call log (arrival times and statuses). The table goes into
bench/RESULTS.md between markers. It measures; it does not pass or fail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import redis

from bench.__main__ import KEY, MODEL
from bench.results import put_section, section, table
from bench.services import UpstreamStack
from routerq.core.settings import Settings
from routerq.devstack.localstack import Service, start_worker
from routerq.producer.batch_client import BatchClient

BEGIN, END = "<!-- rate-discovery:begin -->", "<!-- rate-discovery:end -->"
SLOW_MODEL = "mistralai/mistral-7b-instruct"
R = 100.0
CONCURRENCY = 64
WARMUP_S = 10.0


QUEUE_S = 0.4


def configure(stack: UpstreamStack, limits: dict[str, float]) -> None:
    httpx.post(f"{stack.fake_base}/_fake/config", json={"rate_limits": limits}).raise_for_status()


def forget_rates(stack: UpstreamStack) -> None:
    """Every model's pace and counts gone: each run starts as a first one (a pace lives 2 min)."""
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    for key in client.scan_iter(match="routerq:limit:*"):
        client.delete(key)
    client.close()


def calls(stack: UpstreamStack, tag: str) -> list[dict[str, Any]]:
    return [c for c in stack.fake_calls() if tag in (c.get("prompt") or "")]


def rates(found: list[dict[str, Any]], model: str | None = None) -> tuple[float, float, float]:
    """Succeeded calls/s after the first WARMUP_S (until the last success), the share of calls refused
    with a 429, and the run's length in seconds."""
    found = [c for c in found if model is None or c.get("model") == model]
    start = min(c["t"] for c in found)
    ok = sorted(c["t"] for c in found if c.get("status") == 200)
    steady = [t for t in ok if t >= start + WARMUP_S]
    span = (steady[-1] - start - WARMUP_S) if steady else 0.0
    refused = sum(1 for c in found if c.get("status") == 429)
    return (len(steady) / span if span > 0 else 0.0), refused / len(found), ok[-1] - start


async def script(base_url: str, model: str, prompts: list[str]) -> int:
    """The 30-line script a user would write: AsyncOpenAI with its default retries, a semaphore."""
    client = openai.AsyncOpenAI(
        base_url=base_url, api_key=KEY, timeout=60,
        http_client=openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=CONCURRENCY)),
    )  # fmt: skip
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(prompt: str) -> bool:
        async with semaphore:
            try:
                await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}]
                )
            except openai.APIError:
                return False
            return True

    done = await asyncio.gather(*(one(p) for p in prompts))
    await client.close()
    return sum(done)


def write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w") as out:
        for i, (model, text) in enumerate(rows):
            body = {"model": model, "messages": [{"role": "user", "content": text}]}
            line = {"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            out.write(json.dumps(line) + "\n")
    return path


def routerq_run(
    stack: UpstreamStack, name: str, rows: list[tuple[str, str]], hosts: int = 1, **settings: str
) -> float:
    """The rows as one batch on `hosts` workers; returns the seconds it took."""
    env = {**stack.env, "ROUTERQ_QUEUE": name, "ROUTERQ_TRACING": "false"}
    env.update(settings)
    workers: list[Service] = [
        start_worker(env, stack.tmp, name=f"{name}-{i}", concurrency=CONCURRENCY) for i in range(hosts)
    ]
    client = BatchClient(Settings(**env), tracing=False)  # type: ignore[arg-type]
    try:
        started = time.perf_counter()
        batch = client.submit(write(stack.tmp / f"{name}.jsonl", rows)).batch
        while not (done := client.get(batch.id)).status.final:
            time.sleep(0.2)
        assert (done.succeeded, done.failed) == (len(rows), 0), done
        return time.perf_counter() - started
    finally:
        for worker in workers:
            worker.stop()


def one_host(stack: UpstreamStack, lines: int) -> list[tuple[str, str]]:
    configure(stack, {MODEL: R})
    prompts = [f"script-{i}: say something" for i in range(lines)]
    started = time.perf_counter()
    ok = asyncio.run(script(stack.fake.url, MODEL, prompts))
    script_s = time.perf_counter() - started
    script_rate, script_refused, _ = rates(calls(stack, "script-"))
    time.sleep(2)  # the fake's rolling window empties
    routerq_s = routerq_run(
        stack, "one-host", [(MODEL, f"one-host-{i}: say something") for i in range(lines)]
    )
    rate, refused, _ = rates(calls(stack, "one-host-"))
    return [
        ("one host: the script", f"{script_rate:.1f} ok lines/s after {WARMUP_S:g} s, {script_refused:.1%} "
         f"of calls refused, {ok} of {lines} lines ok in {script_s:.1f} s"),
        ("one host: routerq", f"{rate:.1f} ok lines/s ({rate / R:.2f} R), {refused:.1%} refused, "
         f"{lines} of {lines} ok in {routerq_s:.1f} s"),
        ("one host: routerq / script", f"{rate / script_rate:.2f}x (floor 1.2x; >= 0.85 R; refused <= 5 %)"),
    ]  # fmt: skip


def two_hosts(stack: UpstreamStack, lines: int) -> list[tuple[str, str]]:
    configure(stack, {MODEL: R})
    seconds = routerq_run(stack, "two-hosts", [(MODEL, f"two-hosts-{i}: hi") for i in range(lines)], hosts=2)
    rate, refused, _ = rates(calls(stack, "two-hosts-"))
    return [("two hosts: routerq", f"{rate:.1f} ok lines/s ({rate / R:.2f} R, floor 0.85), {refused:.1%} "
             f"refused (ceiling 5 %), {seconds:.1f} s")]  # fmt: skip


def moving(stack: UpstreamStack, lines: int) -> list[tuple[str, str]]:
    configure(stack, {MODEL: R})
    changes: list[tuple[float, float]] = []

    def move() -> None:
        for at, limit in ((20.0, R / 2), (40.0, R)):
            time.sleep(at - (time.time() - begun))
            configure(stack, {MODEL: limit})
            changes.append((time.time(), limit))

    begun = time.time()
    mover = threading.Thread(target=move, daemon=True)
    mover.start()
    routerq_run(stack, "moving", [(MODEL, f"moving-{i}: hi") for i in range(lines)])
    mover.join()
    ok = Counter(int(c["t"]) for c in calls(stack, "moving-") if c.get("status") == 200)
    rows = []
    for changed_at, limit in changes:
        second = int(changed_at) + 1
        while second < int(changed_at) + 30 and not 0.9 * limit <= ok[second] <= 1.1 * limit:
            second += 1
        after = f"within 10 % after {second - changed_at:.1f} s (floor 10 s)"
        then = f"then {ok[second + 1]}, {ok[second + 2]}, {ok[second + 3]} ok calls/s"
        rows.append((f"moving: R -> {limit:g}/s", f"{after}; {then}"))
    return rows


def two_models(stack: UpstreamStack, lines: int) -> list[tuple[str, str]]:
    configure(stack, {MODEL: R, SLOW_MODEL: R / 10})
    fast, slow = lines * 2 // 3, lines // 10
    rows = [(MODEL, f"two-models-f{i}: hi") for i in range(fast)]
    rows += [(SLOW_MODEL, f"two-models-s{i}: hi") for i in range(slow)]
    rows.sort(key=lambda r: hash(r[1]))  # mixed through the file
    routerq_run(stack, "two-models", rows)
    found = calls(stack, "two-models-")
    fast_rate, fast_refused, fast_s = rates(found, MODEL)
    slow_rate, slow_refused, _ = rates(
        [c for c in found if c["t"] <= min(c["t"] for c in found) + fast_s], SLOW_MODEL
    )
    fast_row = (
        f"{fast_rate:.1f} ok/s ({fast_rate / R:.2f} of its limit, floor 0.8), {fast_refused:.1%} refused"
    )
    slow_share = slow_rate / (R / 10)
    slow_row = f"{slow_rate:.1f} ok/s while the fast one ran ({slow_share:.2f} of its limit, floor 0.8), "
    return [
        ("two models: fast (100/s)", fast_row),
        ("two models: slow (10/s)", slow_row + f"{slow_refused:.1%} refused"),
    ]


def flaky(stack: UpstreamStack, lines: int) -> list[tuple[str, str]]:
    configure(stack, {})  # no limit: only the provider's random refusals
    rule = {"match": "flaky-", "rate_429": 0.25, "retry_after": 1, "seed": "flaky"}
    httpx.post(f"{stack.fake_base}/_fake/config", json={"rules": [rule]}).raise_for_status()
    results = []
    ok = asyncio.run(script(stack.fake.url, MODEL, [f"flaky-script-{i}: hi" for i in range(lines)]))
    script_rate, script_refused, script_s = rates(calls(stack, "flaky-script-"))
    results.append(("flaky: the script", f"{script_rate:.1f} ok lines/s, {script_refused:.1%} refused, "
                    f"{ok} of {lines} ok in {script_s:.1f} s"))  # fmt: skip
    measured = {}
    for label, discovery in (("discovery off", "false"), ("discovery on", "true")):
        tag = f"flaky-{discovery}-"
        time.sleep(2)  # the fake's rolling window empties
        forget_rates(stack)
        seconds = routerq_run(
            stack, f"flaky-{discovery}", [(MODEL, f"{tag}{i}: hi") for i in range(lines)],
            ROUTERQ_RATE_DISCOVERY=discovery,
        )  # fmt: skip
        measured[label], refused, _ = rates(calls(stack, tag))
        row = f"{measured[label]:.1f} ok lines/s, {refused:.1%} refused, all {lines} ok in {seconds:.0f} s"
        results.append((f"flaky: routerq, {label}", row))
    ratio = measured["discovery on"] / measured["discovery off"]
    results.append(("flaky: discovery on / off", f"{ratio:.2f}x (floor 0.9x); "
                    f"{measured['discovery on'] / script_rate:.2f}x the script"))  # fmt: skip
    httpx.post(f"{stack.fake_base}/_fake/config", json={"rules": []}).raise_for_status()
    return results


def queue(stack: UpstreamStack, lines: int) -> list[tuple[str, str]]:
    """A provider whose calls slow down as its limit nears (200 ms, up to QUEUE_S more at the limit):
    latency warns before the 429s."""
    configure(stack, {MODEL: R})
    httpx.post(f"{stack.fake_base}/_fake/config", json={"queue_latency": {MODEL: QUEUE_S}}).raise_for_status()
    try:
        seconds = routerq_run(stack, "queue", [(MODEL, f"queue-{i}: hi") for i in range(lines)])
    finally:
        httpx.post(f"{stack.fake_base}/_fake/config", json={"queue_latency": {}}).raise_for_status()
    found = calls(stack, "queue-")
    rate, refused, _ = rates(found)
    start = min(c["t"] for c in found)
    early = sum(1 for c in found if c.get("status") == 429 and c["t"] < start + WARMUP_S)
    return [
        (f"queue (+{QUEUE_S:g} s at the limit): routerq", f"{rate:.1f} ok lines/s ({rate / R:.2f} R), "
         f"{refused:.1%} refused ({early} in the first {WARMUP_S:g} s), all {lines} ok in {seconds:.0f} s"),
    ]  # fmt: skip


SCENARIOS = {
    "one-host": one_host, "two-hosts": two_hosts, "moving": moving, "two-models": two_models, "flaky": flaky,
    "queue": queue,
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", choices=list(SCENARIOS))
    parser.add_argument("--lines", type=int, default=3000)
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="routerq-bench-") as tmp_dir:
        stack = UpstreamStack(Path(tmp_dir), KEY)
        try:
            stack.configure(latency_ms=200)
            for name, scenario in SCENARIOS.items():
                if args.only in (None, name):
                    lines = args.lines * 2 if name == "moving" else args.lines
                    rows += scenario(stack, lines)
                    print(table(rows), flush=True)
                    stack.reset_fake()
                    forget_rates(stack)
                    time.sleep(2)
        finally:
            stack.close()
    setup = (
        "Command: `python -m bench.rate_discovery`; the fake at 200 ms +-20 % a call, admitting R requests "
        "of a model per rolling second (429 + Retry-After: 1 beyond); one `routerq worker --concurrency "
        f"{CONCURRENCY}` per host, default settings, tracing off."
    )
    if args.only is None:
        put_section(
            BEGIN, END, section(BEGIN, END, "Rate discovery against a hidden limit", setup, table(rows))
        )


if __name__ == "__main__":
    main()
