"""Concurrency scenarios: routerq against a hand-written asyncio script, calls in flight by the hundred.

    python -m bench.scenarios                      # all three scenarios
    python -m bench.scenarios --scenario c256      # one of c64, c256, c1024

Each scenario runs, back to back on the same fake upstream (latency +-20 %): the asyncio +
AsyncOpenAI + semaphore script in its own process, routerq untraced, and routerq traced with spans
sent to an endpoint that discards them (routerq's tracing cost without Phoenix's); and, as a reference
beside the floors' baseline, the same script on the openai client's aiohttp backend, which routerq
uses (a script's author would keep the default httpx one). Throughput, CPU
per 1,000 lines and peak RSS are measured from outside each process tree; ratios are to the script
in the same run. The c64 scenario also times single jobs (`Producer().enqueue(...).get()`) against
the upstream latency the fake recorded. The table goes into bench/RESULTS.md between markers.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.__main__ import KEY, MODEL, mib, pct, start_span_sink, write_batch
from bench.measure import TreeSampler
from bench.results import HEADER, put_section, section, section_rows, table
from bench.services import UpstreamStack
from routerq.core.settings import Settings
from routerq.devstack.localstack import free_port, start_worker
from routerq.producer import Producer
from routerq.producer.batch_client import BatchClient

BEGIN, END = "<!-- scenarios:begin -->", "<!-- scenarios:end -->"
SINGLE_JOBS = 50


@dataclass(frozen=True)
class Scenario:
    concurrency: int
    latency_ms: float
    lines: int
    floor: float  # routerq traced to the sink / the script
    rss_ratio: float | None = None  # routerq's peak RSS at most this many times the script's
    rss_limit_mib: float | None = None


SCENARIOS = {
    "c64": Scenario(64, 200, 5000, 0.9),
    "c256": Scenario(256, 2000, 5000, 0.9, rss_ratio=4.0),
    "c1024": Scenario(1024, 5000, 10_000, 0.85, rss_limit_mib=500),
}
UNTRACED_FLOOR = 0.95
CPU_RATIO_CEILING = 2.0
SINGLE_JOB_OVERHEAD_MS = 20.0


@dataclass
class Measured:
    seconds: float
    lines: int
    cpu_per_1000: float
    peak_rss: int

    @property
    def rate(self) -> float:
        return self.lines / self.seconds


class Stack(UpstreamStack):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, KEY)
        self.sink = self._keep(start_span_sink(free_port(), tmp))
        self.env.update(PHOENIX_COLLECTOR_ENDPOINT=self.sink.url, ROUTERQ_PHOENIX_PRICING="false")


def script(stack: Stack, scenario: Scenario, aiohttp: bool = False) -> Measured:
    argv = [sys.executable, "-m", "bench.baseline", "--base-url", stack.fake.url, "--key", KEY, "--model",
            MODEL, "--lines", str(scenario.lines), "--concurrency", str(scenario.concurrency)]  # fmt: skip
    if aiohttp:
        argv.append("--aiohttp")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    with TreeSampler([process.pid], interval=0.1) as sampler:  # its RSS while it runs
        out, _ = process.communicate(timeout=1800)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # its CPU once it has been waited for
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert process.returncode == 0, f"the asyncio script itself failed (exit {process.returncode})"
    lines = int(json.loads(out)["lines"])
    return Measured(seconds, lines, cpu / lines * 1000, sampler.peak_rss)


def routerq(stack: Stack, scenario: Scenario, name: str, tracing: bool) -> tuple[Measured, float | None]:
    """A batch of the scenario's size through fresh workers; with `name == "c64"` and tracing, also
    the single-job overhead (ms, p50)."""
    env = {**stack.env, "ROUTERQ_TRACING": str(tracing).lower(), "ROUTERQ_QUEUE": f"{name}-{tracing}"}
    settings = Settings(**env)  # type: ignore[arg-type]
    source = write_batch(stack.tmp / f"{name}-{tracing}.jsonl", scenario.lines, f"{name}{tracing}")
    worker = start_worker(env, stack.tmp, name=f"{name}-{tracing}", concurrency=scenario.concurrency)
    batches = BatchClient(settings, tracing=False)
    overhead = None
    try:
        with TreeSampler([worker.process.pid]) as sampler:
            started = time.perf_counter()
            batch = batches.submit(source).batch
            while not (done := batches.get(batch.id)).status.final:
                time.sleep(0.05)
            seconds = time.perf_counter() - started
        assert done.succeeded == scenario.lines, f"{name}: {done.succeeded}/{scenario.lines} succeeded"
        if tracing and name == "c64":
            overhead = single_job_overhead(stack, settings)
    finally:
        worker.stop()
    return Measured(
        seconds, scenario.lines, sampler.cpu_used / scenario.lines * 1000, sampler.peak_rss
    ), overhead


def single_job_overhead(stack: Stack, settings: Settings) -> float:
    """p50 of (enqueue-to-result wall time - the upstream call's own duration), jobs one at a time."""
    producer = Producer(settings, tracing=False)
    walls: dict[str, float] = {}
    for i in range(SINGLE_JOBS):
        prompt = f"single job {i}: say something"
        started = time.perf_counter()
        producer.enqueue({"model": MODEL, "messages": [{"role": "user", "content": prompt}]}).get(timeout=60)
        walls[prompt] = time.perf_counter() - started
    upstream = {c["prompt"]: c["t_end"] - c["t"] for c in stack.fake_calls() if c.get("prompt") in walls}
    return pct([(walls[p] - upstream[p]) * 1000 for p in upstream], 0.5)


def run(stack: Stack, name: str, scenario: Scenario) -> list[tuple[str, str]]:
    stack.configure(scenario.latency_ms)
    base = script(stack, scenario)
    print(f"{name}: script {base}", flush=True)
    untraced, _ = routerq(stack, scenario, name, tracing=False)
    print(f"{name}: routerq untraced {untraced}", flush=True)
    stack.configure(scenario.latency_ms)
    reference = script(stack, scenario, aiohttp=True)
    print(f"{name}: script on aiohttp {reference}", flush=True)
    stack.configure(scenario.latency_ms)
    traced, overhead = routerq(stack, scenario, name, tracing=True)
    label = f"{name} (C={scenario.concurrency}, {scenario.latency_ms:g} ms, {scenario.lines} lines)"
    rows = [
        (f"{label}: script lines/s, CPU s per 1,000 lines, peak RSS",
         f"{base.rate:.1f}, {base.cpu_per_1000:.2f}, {mib(base.peak_rss)}"),
        (f"{label}: routerq untraced lines/s (ratio, floor {UNTRACED_FLOOR})",
         f"{untraced.rate:.1f} ({untraced.rate / base.rate:.3f})"),
        (f"{label}: routerq traced to a sink lines/s (ratio, floor {scenario.floor})",
         f"{traced.rate:.1f} ({traced.rate / base.rate:.3f})"),
        (f"{label}: reference, the script on the openai client's aiohttp backend (routerq's): lines/s "
         "(routerq untraced / it), CPU s per 1,000 lines",
         f"{reference.rate:.1f} ({untraced.rate / reference.rate:.3f}), {reference.cpu_per_1000:.2f}"),
        (f"{label}: routerq CPU s per 1,000 lines untraced / traced (ratio to the script, ceiling "
         f"{CPU_RATIO_CEILING})",
         f"{untraced.cpu_per_1000:.2f} / {traced.cpu_per_1000:.2f} "
         f"({untraced.cpu_per_1000 / base.cpu_per_1000:.2f} / "
         f"{traced.cpu_per_1000 / base.cpu_per_1000:.2f})"),
        (f"{label}: routerq worker peak RSS untraced / traced (ratio to the script)",
         f"{mib(untraced.peak_rss)} / {mib(traced.peak_rss)} "
         f"({untraced.peak_rss / base.peak_rss:.1f} / {traced.peak_rss / base.peak_rss:.1f})"),
    ]  # fmt: skip
    if overhead is not None:
        rows.append((f"{label}: single job, enqueue -> result minus upstream time, p50 "
                     f"(ceiling {SINGLE_JOB_OVERHEAD_MS:g} ms)", f"{overhead:.1f} ms"))  # fmt: skip
    return rows


def write(rows: list[tuple[str, str]], command: str, only: bool = False) -> str:
    body = table(rows)
    if only:  # one scenario re-measured: keep the others' rows
        names = {k.split(" ")[0].rstrip(":") for k, _ in rows}
        others = [
            r
            for r in section_rows(BEGIN, END)
            if not r.startswith("| measure") and r[2:].split(" ")[0].rstrip(":") not in names
        ]
        body = "\n".join([*HEADER, *others, *body.splitlines()[len(HEADER) :]])
    setup = (
        "Each routerq run: one `routerq worker --concurrency C` (one process per core), a batch of "
        "the scenario's lines; the fake upstream, Redis and the span sink on this machine too."
    )
    put_section(BEGIN, END, section(BEGIN, END, f"Concurrency scenarios (`{command}`)", setup, body))
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    args = parser.parse_args()
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="routerq-scenarios-") as tmp:
        stack = Stack(Path(tmp))
        try:
            for name in names:
                try:
                    rows += run(stack, name, SCENARIOS[name])
                except Exception as exc:  # say what broke, keep the other scenarios' numbers
                    rows.append((f"{name}: not measured", f"{type(exc).__name__}: {str(exc)[:200]}"))
                print("\n".join(f"{k}: {v}" for k, v in rows[-7:]), flush=True)
        finally:
            stack.close()
    command = "python -m bench.scenarios " + " ".join(sys.argv[1:])
    print(write(rows, command.strip(), only=args.scenario != "all"))


if __name__ == "__main__":
    main()
