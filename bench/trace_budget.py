"""The trace budget against a real Phoenix on the same cores: what tracing costs, and what Phoenix keeps.

    python -m bench.trace_budget                  # both parts
    python -m bench.trace_budget --bulk-lines 20000 --skip-throughput   # a quicker look at part 2

1. Throughput: C=64, 200 ms +-20 %, 5,000 lines: routerq untraced and traced at the default
   ROUTERQ_TRACE_BUDGET to a local `phoenix serve` (SQLite) on this machine, alternating; the ratio of
   the medians.
2. Bulk: a 100,000-line batch at the default budget, 1 % of lines failing (400) and 1 % retried once
   (502), fake upstream at 20 ms: spans Phoenix refused (first tries sent again) and spans dropped,
   every failed and every retried line looked up in Phoenix by custom_id with its whole trace, the
   batch summary, and how long Phoenix stays busy after the batch ends.
The table goes into bench/RESULTS.md between markers. It measures; it does not pass or fail.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import redis
from phoenix.client import Client

from bench.__main__ import KEY, MODEL, write_batch
from bench.measure import TreeSampler, wait_idle
from bench.results import put_section, section, table
from bench.services import UpstreamStack
from routerq.core.batch_store import Batch
from routerq.core.export_counts import ExportCounts
from routerq.core.settings import DEFAULT_TRACE_BUDGET, Settings
from routerq.devstack.localstack import free_port, start_phoenix, start_worker
from routerq.producer.batch_client import BatchClient

PROJECT = "routerq-trace-budget"
TRACED_FLOOR = 0.9
IDLE_CEILING_S = 10.0


class Stack(UpstreamStack):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, KEY)
        self.phoenix = self._keep(start_phoenix(free_port(), free_port(), tmp / "phoenix"))
        self.env.update(PHOENIX_COLLECTOR_ENDPOINT=self.phoenix.url, PHOENIX_PROJECT_NAME=PROJECT)
        self.ended_at = 0.0  # perf_counter() when the last batch run became final

    def run_batch(self, source: Path, name: str, concurrency: int, **env: str) -> tuple[Batch, float, float]:
        """A batch through a fresh `routerq worker`: the batch at its end, the seconds it took, and the
        cores Phoenix used meanwhile."""
        full = {**self.env, "ROUTERQ_QUEUE": name, **env}
        worker = start_worker(full, self.tmp, name=name, concurrency=concurrency)
        batches = BatchClient(Settings(**full), tracing=False)  # type: ignore[arg-type]
        try:
            with TreeSampler([self.phoenix.process.pid], interval=1.0) as phoenix:
                started = time.perf_counter()
                batch = batches.submit(source).batch
                while not (done := batches.get(batch.id)).status.final:
                    time.sleep(0.1)
                self.ended_at = time.perf_counter()
                seconds = self.ended_at - started
        finally:
            worker.stop()
        return done, seconds, phoenix.cpu_used / seconds


def throughput(stack: Stack, budgets: list[str], repeats: int) -> list[tuple[str, str]]:
    """Untraced and traced runs alternate, `repeats` times each: this machine is shared, and a run's
    neighbours move it by 20-30 %; the medians are compared."""
    label = "C=64, 200 ms, 5,000 lines"
    source = write_batch(stack.tmp / "c64.jsonl", 5000, "c64")
    rows: list[tuple[str, str]] = []
    for budget in budgets:
        off: list[float] = []
        on: list[float] = []
        cores: list[float] = []
        traced: list[str] = []
        for _ in range(repeats):
            stack.configure(200)
            _, seconds, _ = stack.run_batch(source, "c64-off", 64, ROUTERQ_TRACING="false")
            off.append(5000 / seconds)
            stack.configure(200)
            batch, seconds, used = stack.run_batch(source, f"c64-{budget}", 64, ROUTERQ_TRACE_BUDGET=budget)
            on.append(5000 / seconds)
            cores.append(used)
            traced.append(f"{batch.traced}")
            said = f"untraced {off[-1]:.1f}, traced {on[-1]:.1f} lines/s, Phoenix {used:.2f} cores"
            print(f"budget {budget}: {said}", flush=True)
        ratio = median(on) / median(off)
        name = "default" if budget == f"{DEFAULT_TRACE_BUDGET:g}" else "not the default"
        rows += [
            (f"{label}, budget {budget} spans/s ({name}): untraced / traced to the local Phoenix, lines/s, "
             f"each run", " / ".join(f"{a:.0f}" for a in off) + " vs " + " / ".join(f"{b:.0f}" for b in on)),
            (f"{label}, budget {budget}: traced / untraced, medians (floor {TRACED_FLOOR})", f"{ratio:.3f}"),
            (f"{label}, budget {budget}: lines traced of 5,000; Phoenix CPU meanwhile (cores)",
             f"{', '.join(traced)}; {', '.join(f'{c:.2f}' for c in cores)}"),
        ]  # fmt: skip
    return rows


def write_bulk(path: Path, lines: int) -> tuple[Path, set[int], set[int]]:
    failing = {i for i in range(lines) if i % 100 == 37}
    retried = {i for i in range(lines) if i % 100 == 71}
    with path.open("w") as out:
        for i in range(lines):
            directive = " [[status:400]]" if i in failing else " [[flaky:1:502]]" if i in retried else ""
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"bulk {i}: say something{directive}"}],
            }
            out.write(json.dumps({"custom_id": f"c-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": body}) + "\n")  # fmt: skip
    return path, failing, retried


def phoenix_lines(stack: Stack, batch_id: str, wanted: set[int]) -> dict[int, int]:
    """Line index -> spans in its trace, for the `wanted` lines Phoenix holds (looked up by custom_id)."""
    client = Client(base_url=stack.phoenix.url)
    roots = client.spans.get_spans(
        project_identifier=PROJECT, name="routerq.line", attributes={"routerq.batch.id": batch_id},
        limit=1_000_000, timeout=600,
    )  # fmt: skip
    by_line = {
        int(s["attributes"]["routerq.custom_id"].removeprefix("c-")): s["context"]["trace_id"]
        for s in roots
        if int(s["attributes"]["routerq.custom_id"].removeprefix("c-")) in wanted
    }
    counts: dict[int, int] = {}
    ids = list(by_line.items())
    for start in range(0, len(ids), 200):
        chunk = dict(ids[start : start + 200])
        spans = client.spans.get_spans(
            project_identifier=PROJECT, trace_ids=list(chunk.values()), limit=100_000, timeout=600
        )
        per_trace: dict[str, int] = {}
        for span in spans:
            per_trace[span["context"]["trace_id"]] = per_trace.get(span["context"]["trace_id"], 0) + 1
        for line, trace_id in chunk.items():
            counts[line] = per_trace.get(trace_id, 0)
    return counts


def bulk(stack: Stack, lines: int) -> list[tuple[str, str]]:
    stack.configure(20)
    source, failing, retried = write_bulk(stack.tmp / "bulk.jsonl", lines)
    done, seconds, _ = stack.run_batch(source, "bulk", 64)
    stopping = time.perf_counter() - stack.ended_at  # the worker's shutdown, after the batch's end
    idle = stopping + wait_idle([stack.phoenix.process.pid], quiet=0.05, every=1.0)
    counts = ExportCounts.read(redis.Redis.from_url(stack.redis.url))
    print(f"bulk: {done.total} lines in {seconds:.0f} s, {done.traced} traced; Phoenix idle "
          f"{idle:.1f} s after the batch's end (the worker's stop took {stopping:.1f} s); spans {counts}",
          flush=True)  # fmt: skip
    found = phoenix_lines(stack, done.id, failing | retried)
    failed_whole = sum(1 for i in failing if found.get(i) == 2)  # root + the failed call
    retried_whole = sum(1 for i in retried if found.get(i) == 3)  # root + failed call + good call
    summary = Client(base_url=stack.phoenix.url).spans.get_spans(
        project_identifier=PROJECT, name="routerq.batch", attributes={"routerq.batch.id": done.id}
    )
    label = f"{lines:,}-line batch, 20 ms, default budget ({DEFAULT_TRACE_BUDGET:g} spans/s)"
    return [
        (f"{label}: lines/s, succeeded / failed",
         f"{done.total / seconds:.1f}, {done.succeeded} / {done.failed}"),
        (f"{label}: lines traced / sampled out", f"{done.traced} / {done.sampled_out}"),
        (f"{label}: spans sent / refused by Phoenix at first try (sent again) / dropped (floor 0)",
         f"{counts.sent} / {counts.retried} / {counts.dropped}"),
        (f"{label}: failed lines with their whole trace in Phoenix", f"{failed_whole} of {len(failing)}"),
        (f"{label}: retried lines with their whole trace in Phoenix", f"{retried_whole} of {len(retried)}"),
        (f"{label}: batch summary trace in Phoenix", "yes" if summary else "NO"),
        (f"{label}: Phoenix busy after the batch ended (ceiling {IDLE_CEILING_S:g} s)", f"{idle:.1f} s"),
    ]  # fmt: skip


def write(rows: list[tuple[str, str]], command: str, part: str) -> str:
    """Each part has its own section, so running one part keeps the other's numbers."""
    begin, end = f"<!-- trace-budget-{part}:begin -->", f"<!-- trace-budget-{part}:end -->"
    setup = (
        "One `routerq worker` (one process per core), Redis, the fake upstream and `phoenix serve` "
        "(SQLite) all on this machine."
    )
    title = f"Trace budget, {part} (`{command}`)"
    put_section(begin, end, section(begin, end, title, setup, table(rows)))
    return table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bulk-lines", type=int, default=100_000)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-bulk", action="store_true")
    parser.add_argument("--budgets", default=f"{DEFAULT_TRACE_BUDGET:g}", help="comma-separated, for part 1")
    parser.add_argument("--repeats", type=int, default=3, help="alternating untraced/traced runs per budget")
    args = parser.parse_args()
    command = ("python -m bench.trace_budget " + " ".join(sys.argv[1:])).strip()
    with tempfile.TemporaryDirectory(prefix="routerq-trace-budget-") as tmp:
        stack = Stack(Path(tmp))
        try:
            if not args.skip_throughput:
                print(
                    write(throughput(stack, args.budgets.split(","), args.repeats), command, "throughput"),
                    flush=True,
                )
            if not args.skip_bulk:
                print(write(bulk(stack, args.bulk_lines), command, "bulk"), flush=True)
        finally:
            stack.close()


if __name__ == "__main__":
    main()
