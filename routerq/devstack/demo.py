"""`routerq demo`: a local stack on embedded defaults, example jobs of each kind, and the Phoenix link."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from rich.console import Console

from routerq.core import telemetry
from routerq.core.errors import StackError
from routerq.core.jobs import Job, JobKind
from routerq.core.settings import Settings
from routerq.devstack.localstack import (
    Service,
    free_port,
    start_fake_openrouter,
    start_phoenix,
    start_redis,
    start_worker,
)
from routerq.producer import Producer
from routerq.producer.batch_client import BatchClient
from routerq.producer.embed_client import EmbedClient

STATE_DIR = Path(".routerq")
STATE_FILE = STATE_DIR / "stack.json"
LOCAL_KEY = "sk-or-v1-local-demo-key"
console = Console(stderr=True, highlight=False)

EXAMPLES: list[tuple[JobKind, dict[str, Any]]] = [
    (JobKind.CHAT, {"model": "meta-llama/llama-3.1-8b-instruct",
                    "messages": [{"role": "user", "content": "Write a haiku about observability."}]}),
    (JobKind.COMPLETION, {"model": "mistralai/mistral-7b-instruct", "prompt": "Once upon a time"}),
    (JobKind.EMBEDDING, {"model": "openai/text-embedding-3-small", "input": "some text"}),
]  # fmt: skip


def _port(preferred: int) -> int:
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", preferred)) != 0:
            return preferred
    return free_port()


def _record(services: list[Service]) -> None:
    STATE_FILE.write_text(json.dumps({s.name: s.process.pid for s in services}))


def stop_recorded() -> list[str]:
    """What `make down` does: stop the process groups an earlier demo recorded."""
    if not STATE_FILE.exists():
        return []
    stopped = []
    for name, pid in json.loads(STATE_FILE.read_text()).items():
        try:
            os.killpg(pid, signal.SIGTERM)
            stopped.append(name)
        except ProcessLookupError:
            continue
    STATE_FILE.unlink()
    return stopped


def run_demo(keep: bool) -> int:
    stop_recorded()
    STATE_DIR.mkdir(exist_ok=True)
    logs = STATE_DIR / "logs"
    services: list[Service] = []
    try:
        console.print("[bold]routerq demo[/bold]: starting Redis, Phoenix, a worker ...")
        redis_service = start_redis(_port(6379), STATE_DIR / "redis")
        services.append(redis_service)
        phoenix = start_phoenix(_port(6006), free_port(), STATE_DIR / "phoenix")
        services.append(phoenix)
        env = {
            "REDIS_URL": redis_service.url,
            "PHOENIX_COLLECTOR_ENDPOINT": phoenix.url,
            "PHOENIX_PROJECT_NAME": os.environ.get("PHOENIX_PROJECT_NAME", "routerq-demo"),
            # A demo is for looking at traces: every line of its small batches goes to Phoenix.
            "ROUTERQ_TRACE_BUDGET": os.environ.get("ROUTERQ_TRACE_BUDGET", "all"),
        }
        if not os.environ.get("OPENROUTER_API_KEY"):
            fake = start_fake_openrouter(_port(8765), logs, keys=[LOCAL_KEY], latency_ms=150)
            services.append(fake)
            env |= {"OPENROUTER_API_KEY": LOCAL_KEY, "OPENROUTER_BASE_URL": fake.url}
            console.print(f"no OPENROUTER_API_KEY: using the local OpenRouter stand-in at {fake.url}")
        os.environ.update(env)
        services.append(start_worker(env, logs, concurrency=8))
        _record(services)
        failures = _run_examples(Settings(**env))  # type: ignore[arg-type]
        console.print(
            f"\n[bold]Phoenix[/bold]: {phoenix.url}/projects  (project {env['PHOENIX_PROJECT_NAME']})"
        )
        console.print(f"logs: {logs}/")
        if keep and sys.stdin.isatty():
            console.print("The stack keeps running for you to look around; Ctrl-C stops it.")
            console.print("To use it from another terminal:")
            routerq_bin = Path(sys.executable).parent
            console.print(f"export PATH={routerq_bin}:$PATH", markup=False)  # `routerq` itself
            console.print(export_lines(env), markup=False)
            while all(s.alive() for s in services):
                time.sleep(1)
        return 1 if failures else 0
    except StackError as exc:
        console.print(f"[red]{exc}[/red]")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for service in reversed(services):
            service.stop()
        STATE_FILE.unlink(missing_ok=True)
        console.print("stopped the local stack")


def export_lines(env: dict[str, str]) -> str:
    """Shell lines that point `routerq` at this stack; a real OpenRouter key is never printed."""
    shown = {k: v for k, v in env.items() if k != "OPENROUTER_API_KEY" or v == LOCAL_KEY}
    return "\n".join(f"export {name}={value}" for name, value in shown.items())


def _run_examples(settings: Settings) -> int:
    producer = Producer(settings)
    failures = 0
    for kind, body in EXAMPLES:
        job = Job(kind=kind, body=body, session_id="demo-session", user_id="demo-user", tags=["demo"])
        result = producer.run(job, timeout=120)
        cost = f"${result.usage.cost:.8f}" if result.usage and result.usage.cost is not None else "n/a"
        if result.ok:
            console.print(
                f"[green]{kind.value:<10}[/green] {result.model} via {result.provider}, cost {cost}"
            )
            print(f"{kind.value}: {result.text}")
        else:
            failures += 1
            console.print(
                f"[red]{kind.value:<10} failed: {result.error.message if result.error else ''}[/red]"
            )
    failures += _run_example_files(settings)
    telemetry.flush()
    return failures


def _run_example_files(settings: Settings) -> int:
    """The sample batch file and embedding input from examples/, as a user would run them."""
    examples = Path(str(files("routerq.devstack") / "examples"))
    batches = BatchClient(settings)
    batch = batches.submit(examples / "batch.jsonl", name="demo batch").batch
    batch = batches.wait(batch.id, lambda _: None)
    with (STATE_DIR / "batch-results.jsonl").open("wb") as out:
        batches.write_results(batch, out)
    console.print(
        f"[green]batch[/green]      {batch.id}: {batch.succeeded}/{batch.total} succeeded, "
        f"cost ${batch.cost:.8f}"
    )
    print(f"batch: {batch.id} {batch.status.value} {batch.succeeded}/{batch.total}")

    embedder = EmbedClient(settings)
    plan = embedder.start(examples / "texts.csv", "openai/text-embedding-3-small", per_request=4)
    run = embedder.wait(plan.run.id, lambda _: None)
    written = embedder.write(run, STATE_DIR / "vectors.jsonl")
    console.print(
        f"[green]embed[/green]      {written} vectors of examples/texts.csv in {STATE_DIR}/vectors.jsonl"
    )
    print(f"embed: {written} vectors")
    return batch.failed + run.failed
