"""Benchmark: how long `routerq` commands take from the shell prompt back to it.

    python -m bench.startup                # 20 interleaved rounds
    python -m bench.startup --rounds 40

Every command runs against a local Redis holding one small batch; `enqueue` traces to a local span
collector that keeps nothing (what Phoenix does with the spans is not the command's time). Each round
runs every command once, in turn, so a noisy neighbour slows them all alike. Two baselines from the
same rounds: the interpreter alone (`python -c pass`), and the import of the libraries the read
commands cannot do without (redis-py, pydantic-settings, typer, rich), as a `routerq` process imports
them: what is above that is routerq's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.__main__ import start_span_sink
from bench.results import put_section, section, table
from bench.services import Services
from routerq.devstack.localstack import free_port, start_redis

READ_FLOOR_S = 0.5  # issue 12: status, batches and results start in under half a second
ENQUEUE_FLOOR_S = 1.0  # and `routerq enqueue` returns in under a second
BEGIN, END = "<!-- startup:begin -->", "<!-- startup:end -->"
LINE = '{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}\n'


class Stack(Services):
    def __init__(self, tmp: Path) -> None:
        super().__init__()
        self.redis = self._keep(start_redis(free_port(), tmp / "redis"))
        self.sink = self._keep(start_span_sink(free_port(), tmp))
        self.env = {
            **os.environ,
            "REDIS_URL": self.redis.url,
            "PHOENIX_COLLECTOR_ENDPOINT": self.sink.url,
            "PHOENIX_DISCOVER_CONFIG": "false",
        }


def routerq(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("routerq")), *args]


def commands(tmp: Path, batch_id: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (argv, extra environment)."""
    untraced = {"ROUTERQ_TRACING": "false"}
    # as a routerq process imports them: redis-py without OpenTelemetry's metrics (routerq/cli/__init__.py)
    libraries = (
        "import sys; sys.modules.update(dict.fromkeys(['opentelemetry.metrics', "
        "'opentelemetry.sdk.metrics'])); import redis, pydantic_settings, typer, rich.console"
    )
    return {
        "python -c pass": ([sys.executable, "-c", "pass"], {}),
        "import of the libraries": ([sys.executable, "-c", libraries], {}),
        "routerq status BATCH": (routerq("status", batch_id), {}),
        "routerq batches": (routerq("batches"), {}),
        "routerq results BATCH": (routerq("results", batch_id, "-o", str(tmp / "out.jsonl")), {}),
        "routerq enqueue (traced)": (routerq("enqueue", "hello"), {}),
        "routerq enqueue (tracing off)": (routerq("enqueue", "hello"), untraced),
    }


def measure(stack: Stack, rounds: int, tmp: Path) -> dict[str, list[float]]:
    source = tmp / "batch.jsonl"
    source.write_text(LINE)
    submitted = subprocess.run(routerq("submit", str(source)), env=stack.env, capture_output=True, text=True)
    if submitted.returncode != 0:
        raise SystemExit(f"routerq submit failed: {submitted.stderr}")
    runs = commands(tmp, submitted.stdout.split()[-1])
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds + 1):  # the first round warms the disk cache and is not counted
        for name, (argv, extra) in runs.items():
            started = time.perf_counter()
            done = subprocess.run(argv, env={**stack.env, **extra}, capture_output=True)
            elapsed = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
            times[name].append(elapsed)
    return {name: values[1:] for name, values in times.items()}


def rows(times: dict[str, list[float]]) -> list[tuple[str, str]]:
    interpreter = statistics.median(times["python -c pass"])
    libraries = statistics.median(times["import of the libraries"])
    out = []
    for name, values in times.items():
        ordered = sorted(values)
        p50 = statistics.median(ordered)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        floor = READ_FLOOR_S if name.split()[1:2] in (["status"], ["batches"], ["results"]) else None
        floor = ENQUEUE_FLOOR_S if "enqueue" in name else floor
        verdict = "" if floor is None else f"; floor < {floor:g} s: {'met' if p50 < floor else 'MISSED'}"
        out.append(
            (
                f"`{name}`",
                f"p50 {p50:.3f} s (min {ordered[0]:.3f}, p90 {p90:.3f}); "
                f"{p50 / interpreter:.1f}x the interpreter, {p50 - libraries:+.3f} s over the libraries"
                f"{verdict}",
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    command = ("python -m bench.startup " + " ".join(sys.argv[1:])).strip()
    with tempfile.TemporaryDirectory(prefix="routerq-startup-") as tmp:
        stack = Stack(Path(tmp))
        try:
            result = table(rows(measure(stack, args.rounds, Path(tmp))))
        finally:
            stack.close()
    setup = (
        f"{args.rounds} interleaved rounds; Redis and a span collector that keeps nothing on this machine; "
        "wall time of each process, start to exit."
    )
    put_section(BEGIN, END, section(BEGIN, END, f"Start-up (`{command}`)", setup, result))
    print(result)


if __name__ == "__main__":
    main()
