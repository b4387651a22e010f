"""Half price for work that can wait: the same file live and `--via batch`, on the fake upstream.

    python -m bench.upstream_batches                 # 10,000 lines
    python -m bench.upstream_batches --lines 2000    # a quicker look

Measures the cost ratio (batch / live, from each routerq batch's recorded cost; floor <= 0.55) and
routerq's lag: from the moment an upstream batch completed at the fake (its submission plus the fake's
`batch_s`) to the moment routerq had recorded its lines (the chunk's done_at), p95 over the chunks,
against one poll interval + 2 s (the interval in effect then: polls come 2, 4, 8 ... 60 s apart).
The table goes into bench/RESULTS.md between markers. It measures; it does not pass or fail.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

from bench.__main__ import KEY, write_batch
from bench.results import put_section, section, table
from bench.services import UpstreamStack
from routerq.core.batch_store import Batch, Via
from routerq.core.settings import Settings
from routerq.core.upstream_batch import batch_owner, chunk_key, chunks_key
from routerq.devstack.localstack import start_worker
from routerq.producer.batch_client import BatchClient
from routerq.worker.upstream.batch_api import POLL_FIRST_S, next_poll_s

BEGIN, END = "<!-- upstream-batches:begin -->", "<!-- upstream-batches:end -->"
COST_FLOOR = 0.55
BATCH_S = 20.0  # the fake's upstream batches take this long: minutes in life, compressed


def run(stack: UpstreamStack, source: Path, via: Via, name: str) -> tuple[Batch, float]:
    env = {**stack.env, "ROUTERQ_QUEUE": name, "ROUTERQ_TRACING": "false"}
    worker = start_worker(env, stack.tmp, name=name, concurrency=64)
    client = BatchClient(Settings(**env), tracing=False)  # type: ignore[arg-type]
    try:
        started = time.perf_counter()
        batch = client.submit(source, via=via).batch
        while not (done := client.get(batch.id)).status.final:
            time.sleep(0.2)
        return done, time.perf_counter() - started
    finally:
        worker.stop()


def poll_interval_at(elapsed: float) -> float:
    """The gap between the poll that saw a batch done and the one before it, `elapsed` s after submission."""
    at, interval, polls = POLL_FIRST_S, POLL_FIRST_S, 0
    while at < elapsed:
        polls += 1
        interval = next_poll_s(polls)
        at += interval
    return interval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lines", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="routerq-bench-") as tmp_dir:
        stack = UpstreamStack(Path(tmp_dir), KEY)
        try:
            stack.configure(latency_ms=200)
            httpx.post(f"{stack.fake_base}/_fake/config", json={"batch_s": BATCH_S}).raise_for_status()
            source = write_batch(stack.tmp / "file.jsonl", args.lines, "ub")
            live, live_s = run(stack, source, Via.LIVE, "live")
            batch, batch_s = run(stack, source, Via.BATCH, "batch")
            submitted = {c["batch_id"]: c["t"] for c in stack.fake_calls() if c.get("kind") == "batch"}
            client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
            lags, slack = [], []
            for chunk_id in client.hkeys(chunks_key(batch_owner(batch.id))):
                state = client.hgetall(chunk_key(batch_owner(batch.id), str(chunk_id)))
                completed = submitted[state["upstream_id"]] + BATCH_S
                lag = float(state["done_at"]) - completed
                lags.append(lag)
                slack.append(poll_interval_at(completed - submitted[state["upstream_id"]]) + 2 - lag)
        finally:
            stack.close()
    lags.sort()
    p95 = lags[min(len(lags) - 1, int(0.95 * len(lags)))]
    ratio = batch.cost / live.cost if live.cost else float("nan")
    rows = [
        ("lines", f"{args.lines:,}"),
        ("live: cost, time", f"${live.cost:.6f}, {live_s:.1f} s ({live.succeeded} succeeded)"),
        ("via batch: cost, time", f"${batch.cost:.6f}, {batch_s:.1f} s ({batch.succeeded} succeeded)"),
        ("cost ratio batch / live", f"{ratio:.3f} (floor <= {COST_FLOOR})"),
        ("upstream batches", f"{len(lags)}"),
        ("lag after the upstream batch completed, p95", f"{p95:.1f} s"),
        ("lag within its poll interval + 2 s", f"{sum(s >= 0 for s in slack)} of {len(slack)} chunks"),
    ]
    setup = (
        f"Command: `python -m bench.upstream_batches --lines {args.lines}`; the fake at 200 ms +-20 % a live "
        f"call, its upstream batches done {BATCH_S:g} s after submission; one `routerq worker` "
        "--concurrency 64 per run, tracing off."
    )
    put_section(BEGIN, END, section(BEGIN, END, "OpenRouter's Batch API: cost and lag", setup, table(rows)))
    print(table(rows))
    sys.exit(0)


if __name__ == "__main__":
    main()
