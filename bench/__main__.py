"""Benchmark: routerq against a hand-written asyncio script, on the local fake OpenRouter.

    python -m bench                      # defaults: N=5000, C=64, 200 ms +-20 %, one `routerq worker`
    python -m bench --lines 1000 --big 10000 --skip-huge     # a quicker look

Prints a table and writes it, with the command and the machine, to bench/RESULTS.md. Not a test:
it measures, it does not pass or fail. Ratios come from runs made back to back on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from bench.baseline import run_baseline
from bench.measure import TreeSampler, cpu_seconds, wait_idle
from bench.services import Services
from routerq.core import telemetry
from routerq.core.settings import Settings
from routerq.devstack.localstack import (
    Service,
    free_port,
    spawn,
    start_fake_openrouter,
    start_phoenix,
    start_redis,
    start_worker,
    wait_until,
)
from routerq.producer.batch_client import BatchClient
from routerq.worker.upkeep.supervisor import default_processes

MODEL = "meta-llama/llama-3.1-8b-instruct"
KEY = "sk-or-v1-bench"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    name: str
    lines: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    queue_waits: list[float] = field(default_factory=list)
    cpu_per_1000: float | None = None
    phoenix_cpu_per_1000: float | None = None
    phoenix_total_per_1000: float | None = None
    phoenix_catch_up: float | None = None
    peak_rss: int | None = None
    spans: tuple[int, int] = (0, 0)

    @property
    def rate(self) -> float:
        return self.lines / self.seconds


def start_span_sink(port: int, log_dir: Path) -> Service:
    argv = [sys.executable, "-m", "bench.span_sink", "--port", str(port)]
    process, log_path = spawn("span-sink", argv, log_dir)
    service = Service("span-sink", process, f"http://127.0.0.1:{port}", log_path)
    wait_until(lambda: "span sink on" in service.log(), 30, "span sink", service)
    return service


def span_counts(workers: list[Service]) -> tuple[int, int]:
    """Spans the workers sent to Phoenix and dropped, from what each process logs at shutdown."""
    sent = dropped = 0
    for worker in workers:
        for match in re.finditer(r"routerq: (\d+) span\(s\) sent to Phoenix, (\d+) dropped", worker.log()):
            sent, dropped = sent + int(match[1]), dropped + int(match[2])
    return sent, dropped


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def spread(values: list[float]) -> str:
    return f"{pct(values, 0.5):.3f} s / {pct(values, 0.95):.3f} s"


def write_batch(path: Path, lines: int, tag: str) -> Path:
    with path.open("w") as out:
        for i in range(lines):
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"{tag} line {i}: say something"}],
            }
            out.write(json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": body}) + "\n")  # fmt: skip
    return path


class Bench(Services):
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        super().__init__()
        self.args = args
        self.tmp = tmp
        self.redis = self._keep(start_redis(free_port(), tmp / "redis"))
        self.fake = self._keep(start_fake_openrouter(free_port(), tmp, keys=[KEY]))
        httpx.post(f"{self.fake_base}/_fake/config", json={"latency_ms": args.latency_ms, "jitter": 0.2})
        self.phoenix = self._keep(start_phoenix(free_port(), free_port(), tmp / "phoenix"))
        self.sink = self._keep(start_span_sink(free_port(), tmp))
        self.env = {
            "REDIS_URL": self.redis.url,
            "OPENROUTER_API_KEY": KEY,
            "OPENROUTER_BASE_URL": self.fake.url,
            "PHOENIX_COLLECTOR_ENDPOINT": self.phoenix.url,
            "PHOENIX_PROJECT_NAME": "routerq-bench",
            "PHOENIX_DISCOVER_CONFIG": "false",
        }
        self.client = redis.Redis.from_url(self.redis.url)

    def baseline(self) -> Run:
        self.reset_fake()
        prompts = [f"baseline line {i}: say something" for i in range(self.args.lines)]
        started = time.perf_counter()
        latencies = asyncio.run(run_baseline(self.fake.url, KEY, MODEL, prompts, self.args.concurrency))
        return Run(
            "asyncio + AsyncOpenAI + semaphore", len(prompts), time.perf_counter() - started, latencies
        )

    def workers(self, env: dict[str, str], name: str) -> list[Service]:
        per_worker = max(1, self.args.concurrency // self.args.workers)
        return [
            start_worker(
                env,
                self.tmp,
                name=f"{name}-{i}",
                concurrency=per_worker,
                processes=self.args.processes,
            )
            for i in range(self.args.workers)
        ]

    def routerq(
        self, tracing: bool, lines: int | None = None, tag: str = "", sink: bool = False
    ) -> tuple[Run, BatchClient, str]:
        """One timed batch; with `sink`, the workers' spans go to an endpoint that discards them."""
        lines = lines or self.args.lines
        tag = tag or ("sunk" if sink else "traced" if tracing else "untraced")
        env = {**self.env, "ROUTERQ_TRACING": "true" if tracing else "false", "ROUTERQ_QUEUE": tag}
        if sink:
            env |= {"PHOENIX_COLLECTOR_ENDPOINT": self.sink.url, "ROUTERQ_PHOENIX_PRICING": "false"}
        settings = Settings(**env)  # type: ignore[arg-type]
        batches = BatchClient(settings, tracing=tracing)
        source = write_batch(self.tmp / f"{tag}.jsonl", lines, tag)
        workers = self.workers(env, tag)
        self.reset_fake()
        try:
            with (
                TreeSampler([w.process.pid for w in workers]) as sampler,
                TreeSampler([self.phoenix.process.pid], interval=5) as phoenix,
            ):
                started = time.perf_counter()
                batch = batches.submit(source).batch
                enqueued_at = time.time()
                while not batches.get(batch.id).status.final:
                    time.sleep(0.05)
                seconds = time.perf_counter() - started
        finally:
            for worker in workers:
                worker.stop()  # flushes the workers' span buffers
        catch_up = wait_idle([self.phoenix.process.pid]) if tracing and not sink else 0.0
        phoenix_total = cpu_seconds([self.phoenix.process.pid]) - phoenix.cpu_start
        done = batches.get(batch.id)
        assert done.succeeded == lines, f"{tag}: {done.succeeded}/{lines} succeeded"
        calls = [c for c in self.fake_calls() if tag in (c.get("prompt") or "")]
        run = Run(
            "routerq, tracing on, spans discarded"
            if sink
            else f"routerq, tracing {'on' if tracing else 'off'}",
            lines,
            seconds,
            latencies=[c["t_end"] - enqueued_at for c in calls],
            queue_waits=[c["t"] - enqueued_at for c in calls],
            cpu_per_1000=sampler.cpu_used / lines * 1000,
            phoenix_cpu_per_1000=phoenix.cpu_used / lines * 1000,
            phoenix_total_per_1000=phoenix_total / lines * 1000,
            phoenix_catch_up=catch_up,
            spans=span_counts(workers),
            peak_rss=sampler.peak_rss,
        )
        return run, batches, batch.id

    def redis_memory(self) -> dict[str, float]:
        """Bytes of Redis memory per queued line (no worker running) and per stored line."""
        lines = self.args.lines
        env = {**self.env, "ROUTERQ_QUEUE": "memory"}
        batches = BatchClient(Settings(**env), tracing=False)  # type: ignore[arg-type]
        source = write_batch(self.tmp / "memory.jsonl", lines, "memory")
        before = self._used()
        batch = batches.submit(source).batch
        queued = self._used()
        workers = self.workers({**env, "ROUTERQ_TRACING": "false"}, "memory")
        try:
            while not batches.get(batch.id).status.final:
                time.sleep(0.1)
        finally:
            for worker in workers:
                worker.stop()
        stored = self._used()
        return {"queued": (queued - before) / lines, "stored": (stored - before) / lines}

    def _used(self) -> int:
        time.sleep(0.2)
        return int(self.client.info("memory")["used_memory"])

    def submit_rate(self, lines: int) -> tuple[float, BatchClient, str, Path]:
        env = {**self.env, "ROUTERQ_QUEUE": "big", "ROUTERQ_TRACING": "true"}
        batches = BatchClient(Settings(**env))  # type: ignore[arg-type]
        source = write_batch(self.tmp / "big.jsonl", lines, "big")
        started = time.perf_counter()
        batch = batches.submit(source).batch
        return lines / (time.perf_counter() - started), batches, batch.id, source

    def run_big(self, batches: BatchClient, batch_id: str, total: int) -> dict[str, float]:
        """Work through the big batch, recording worker RSS at 10,000 lines and at the end."""
        httpx.post(f"{self.fake_base}/_fake/config", json={"latency_ms": self.args.big_latency_ms})
        env = {**self.env, "ROUTERQ_QUEUE": "big", "ROUTERQ_TRACING": "true"}
        workers = self.workers(env, f"big{total}")  # its own log: spans are counted from it
        rss: dict[str, float] = {}
        started = time.perf_counter()
        try:
            with TreeSampler([w.process.pid for w in workers]) as sampler:
                while True:
                    batch = batches.get(batch_id)
                    if "rss_10k" not in rss and batch.done >= min(10_000, total):
                        rss["rss_10k"] = sampler.rss_now()
                    if batch.status.final:
                        break
                    time.sleep(0.2)
                rss["rss_end"] = sampler.rss_now()
        finally:
            for worker in workers:
                worker.stop()
        rss["seconds"] = time.perf_counter() - started
        rss["spans_sent"], rss["spans_dropped"] = span_counts(workers)
        rss["succeeded"] = batches.get(batch_id).succeeded
        httpx.post(f"{self.fake_base}/_fake/config", json={"latency_ms": self.args.latency_ms})
        return rss

    def results_cost(self, batch_id: str) -> tuple[float, int]:
        """`routerq results` as a user runs it: wall time and peak RSS of that process.

        Measured through a small intermediate Python: Linux folds the memory a process had before
        exec into its max RSS, so spawning straight from this (large) process would inflate it."""
        out = self.tmp / "results.jsonl"
        command = [str(Path(sys.executable).with_name("routerq")), "results", batch_id, "-o", str(out)]
        probe = (
            "import resource, subprocess, sys; "
            "subprocess.run(sys.argv[1:], check=True, stderr=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", probe, *command],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return time.perf_counter() - started, int(done.stdout.split()[-1]) * 1024


def machine() -> str:
    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), platform.processor())  # fmt: skip
    memory = int(
        next(x.split()[1] for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
    )
    return f"{os.cpu_count()} cores ({cpu}), {memory / 2**20:.0f} GiB, Python {platform.python_version()}"


def mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lines", type=int, default=5000, help="N for the throughput runs")
    parser.add_argument("--concurrency", type=int, default=64, help="C: calls in flight in total")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="the fake's latency (+-20 %%)")
    parser.add_argument("--workers", type=int, default=1, help="`routerq worker` commands sharing C")
    parser.add_argument(
        "--processes", type=int, default=None, help="processes per worker (default: routerq's own choice)"
    )
    parser.add_argument("--big", type=int, default=50_000, help="lines for submit/results/RSS runs")
    parser.add_argument(
        "--big-latency-ms", type=float, default=20.0, help="the fake's latency for the big run"
    )
    parser.add_argument("--huge", type=int, default=100_000, help="a batch this size must complete")
    parser.add_argument("--skip-huge", action="store_true")
    parser.add_argument(
        "--throughput-only", action="store_true", help="only the baseline and the two routerq runs"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = parser.parse_args()
    command = "python -m bench " + " ".join(sys.argv[1:])

    tmp = Path(tempfile.mkdtemp(prefix="routerq-bench-"))
    bench = Bench(args, tmp)
    rows: list[tuple[str, str]] = []
    try:
        print("baseline ...", file=sys.stderr)
        base = bench.baseline()
        print(f"  {base.rate:.0f} lines/s", file=sys.stderr)
        # Untraced first: Phoenix may still be ingesting a traced run's spans afterwards.
        print("routerq, tracing off ...", file=sys.stderr)
        untraced, _, _ = bench.routerq(tracing=False)
        print(f"  {untraced.rate:.0f} lines/s", file=sys.stderr)
        print("routerq, tracing on ...", file=sys.stderr)
        traced, _, _ = bench.routerq(tracing=True)
        print(f"  {traced.rate:.0f} lines/s", file=sys.stderr)
        print("routerq, tracing on, spans discarded ...", file=sys.stderr)
        sunk, _, _ = bench.routerq(tracing=True, sink=True)
        print(f"  {sunk.rate:.0f} lines/s", file=sys.stderr)
        telemetry.flush()
        if args.throughput_only:
            for run in (base, untraced, traced, sunk):
                print(f"{run.name}: {run.rate:.1f} lines/s, worker CPU/1000 {run.cpu_per_1000}, "
                      f"Phoenix CPU/1000 {run.phoenix_cpu_per_1000} ({run.phoenix_total_per_1000} with its "
                      f"backlog, {run.phoenix_catch_up} s after)", file=sys.stderr)  # fmt: skip
            print(f"ratios: on/base {traced.rate / base.rate:.3f}, on/off {traced.rate / untraced.rate:.3f}",
                  file=sys.stderr)  # fmt: skip
            return
        memory = bench.redis_memory()
        print(f"submit of {args.big} lines ...", file=sys.stderr)
        submit_rate, big_batches, big_id, _ = bench.submit_rate(args.big)
        big = bench.run_big(big_batches, big_id, args.big)
        results_s, results_rss = bench.results_cost(big_id)
        small_results_s, small_results_rss = 0.0, 0
        huge: dict[str, float] = {}
        if not args.skip_huge:
            print(f"huge batch of {args.huge} lines ...", file=sys.stderr)
            _, huge_batches, huge_id, _ = bench.submit_rate(args.huge)
            huge = bench.run_big(huge_batches, huge_id, args.huge)
            small_results_s, small_results_rss = results_s, results_rss
            results_s, results_rss = bench.results_cost(huge_id)

        for run in (base, traced, untraced, sunk):
            rows.append((f"{run.name}: lines/s", f"{run.rate:.1f}"))
        rows.append(("ratio routerq (tracing on) / baseline", f"{traced.rate / base.rate:.3f}  (floor 0.9)"))
        rows.append(("ratio tracing on / tracing off", f"{traced.rate / untraced.rate:.3f}  (floor 0.9)"))
        rows.append(("ratio routerq (tracing off) / baseline", f"{untraced.rate / base.rate:.3f}"))
        rows.append(("ratio tracing on, spans discarded / tracing off", f"{sunk.rate / untraced.rate:.3f}"))
        for run in (base, traced, untraced, sunk):
            rows.append((f"{run.name}: line latency p50 / p95", spread(run.latencies)))
        for run in (traced, untraced, sunk):
            rows.append((f"{run.name}: queue wait p50 / p95", spread(run.queue_waits)))
            rows.append((f"{run.name}: worker CPU-seconds per 1,000 lines", f"{run.cpu_per_1000:.2f}"))
            rows.append(
                (f"{run.name}: Phoenix CPU-seconds per 1,000 lines", f"{run.phoenix_cpu_per_1000:.2f}")
            )
            if run.phoenix_catch_up:
                rows.append((f"{run.name}: Phoenix CPU-seconds per 1,000 lines, its backlog included",
                             f"{run.phoenix_total_per_1000:.2f}"))  # fmt: skip
                rows.append((f"{run.name}: Phoenix busy ingesting after the batch finished",
                             f"{run.phoenix_catch_up:.0f} s"))  # fmt: skip
                sent, dropped = run.spans
                rows.append((f"{run.name}: spans sent / dropped by the workers", f"{sent} / {dropped}"))
            rows.append((f"{run.name}: peak worker RSS (all processes)", mib(run.peak_rss or 0)))
        rows.append(("Redis memory per queued line", f"{memory['queued']:.0f} B"))
        rows.append(("Redis memory per stored line (chat result)", f"{memory['stored']:.0f} B"))
        rows.append(
            (f"`routerq submit` rate, {args.big:,} lines", f"{submit_rate:.0f} lines/s  (floor 5,000)")
        )
        rows.append((f"{args.big:,}-line batch at {args.big_latency_ms:g} ms: time",
                     f"{big['seconds']:.0f} s ({big['succeeded']:.0f} succeeded)"))  # fmt: skip
        rows.append((f"{args.big:,}-line batch: spans sent / dropped (Phoenix full: 503)",
                     f"{big['spans_sent']:.0f} / {big['spans_dropped']:.0f}"))  # fmt: skip
        rows.append(("worker RSS at 10,000 lines / at the end",
                     f"{mib(big['rss_10k'])} / {mib(big['rss_end'])} "
                     f"({big['rss_end'] / big['rss_10k'] - 1:+.1%})"))  # fmt: skip
        if huge:
            rows.append(
                (
                    f"{args.huge:,}-line batch: time",
                    f"{huge['seconds']:.0f} s ({huge['succeeded']:.0f} succeeded; spans sent / dropped "
                    f"{huge['spans_sent']:.0f} / {huge['spans_dropped']:.0f})",
                )
            )
            rows.append((f"`routerq results`, {args.big:,} lines: time / peak RSS",
                         f"{small_results_s:.1f} s / {mib(small_results_rss)}"))  # fmt: skip
            rows.append((f"`routerq results`, {args.huge:,} lines: time / peak RSS",
                         f"{results_s:.1f} s / {mib(results_rss)}"))  # fmt: skip
        else:
            rows.append((f"`routerq results`, {args.big:,} lines: time / peak RSS",
                         f"{results_s:.1f} s / {mib(results_rss)}"))  # fmt: skip
    finally:
        bench.close()
        shutil.rmtree(tmp, ignore_errors=True)

    worker_processes = args.processes or default_processes(args.concurrency // args.workers)
    table = "\n".join(["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    report = (
        f"# routerq benchmark\n\nCommand: `{command.strip()}`  \nMachine: {machine()}  \n"
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  \n"
        f"Setup: N={args.lines}, C={args.concurrency}, fake latency {args.latency_ms:g} ms +-20 %, "
        f"{args.workers} x `routerq worker --concurrency {args.concurrency // args.workers}` "
        f"({worker_processes} processes each), "
        "Redis, Phoenix and the fake on this machine too.\n\n" + table + "\n"
    )
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
