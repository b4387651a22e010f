"""Soak: one always-rate-limited job beside ordinary traffic, at default settings, tracing to a local
Phoenix. Reproduces issue 21's "held by a worker that stopped renewing its lease put back" (seen once
in 6.5 minutes on 2026-12-04; none in 6 minutes with tracing off).

    python -m bench.soak_rate_limited --minutes 8

Every 2 s: a single job; every 10 s: a 60-line batch. Prints, every 2 s, the always-429 job's calls
so far, how many of them came less than 0.5 s apart (parallel copies), and the put-backs the workers
logged; the worker's log stays in the printed temp directory. It observes; it does not pass or fail.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import httpx

from bench.__main__ import KEY, MODEL
from bench.services import UpstreamStack
from routerq.core.settings import Settings
from routerq.devstack.localstack import free_port, start_phoenix, start_worker
from routerq.producer.api import Producer
from routerq.producer.batch_client import BatchClient

LIMITED = "Fail for me [[status:429]] [[retry-after:2]]"


class SoakStack(UpstreamStack):
    """Redis, the fake upstream, a local Phoenix and one `routerq worker` at default settings."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, KEY)
        phoenix = self._keep(start_phoenix(free_port(), free_port(), tmp / "phoenix"))
        self.env.update(
            PHOENIX_COLLECTOR_ENDPOINT=phoenix.url, PHOENIX_PROJECT_NAME="soak", ROUTERQ_TRACE_BUDGET="all"
        )
        self.worker = self._keep(start_worker(self.env, tmp, concurrency=8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=8.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="routerq-soak-"))
    print(f"logs in {tmp}")
    stack = SoakStack(tmp)
    try:
        settings = Settings(**stack.env)  # type: ignore[arg-type]
        producer, batches = Producer(settings), BatchClient(settings)
        producer.enqueue({"model": MODEL, "messages": [{"role": "user", "content": LIMITED}]})
        end = time.monotonic() + args.minutes * 60
        for n in itertools.count(1):
            if time.monotonic() >= end:
                break
            producer.enqueue({"model": MODEL, "messages": [{"role": "user", "content": f"hello {n}"}]})
            if n % 5 == 0:
                rows = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
                    "model": MODEL, "messages": [{"role": "user", "content": f"line {n} {i} [[slow:0.2]]"}]}}
                    for i in range(60)]  # fmt: skip
                source = tmp / f"b{n}.jsonl"
                source.write_text("".join(json.dumps(r) + "\n" for r in rows))
                batches.submit(source)
            time.sleep(2)
            calls = httpx.get(f"{stack.fake_base}/_fake/calls", timeout=60).json()["calls"]
            starts = sorted(c["t"] for c in calls if "Fail for me" in (c.get("prompt") or ""))
            close = sum(1 for a, b in itertools.pairwise(starts) if b - a < 0.5)
            put_backs = stack.worker.log().count("put back on")
            print(f"{n * 2:>5} s  limited job: {len(starts)} calls, {close} parallel; put-backs {put_backs}")
    finally:
        stack.close()


if __name__ == "__main__":
    main()
