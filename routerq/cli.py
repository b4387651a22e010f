"""The `routerq` command line."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console

from routerq.jobs import Job, JobKind
from routerq.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="LLM jobs on a Redis queue, traced in Phoenix."
)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _pairs(values: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            err.print(f"[red]{option} expects key=value, got {value!r}[/red]")
            raise typer.Exit(2)
        pairs[key] = val
    return pairs


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, help="jobs in flight")] = 8,
    pool: Annotated[str, typer.Option(help="prefork, threads, solo or gevent")] = "prefork",
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
) -> None:
    """Run a worker that takes jobs from Redis and calls OpenRouter."""
    from worker.main import POOLS, run_worker
    from worker.preflight import PreflightError

    if pool not in POOLS:
        err.print(f"[red]--pool must be one of {', '.join(POOLS)}[/red]")
        raise typer.Exit(2)
    try:
        run_worker(_settings(), concurrency, pool, loglevel)
    except PreflightError as exc:
        err.print(f"[red]routerq worker: {exc}[/red]")
        raise typer.Exit(2) from None


@app.command()
def enqueue(
    prompt: Annotated[str, typer.Argument(help="the prompt, or the text to embed")],
    model: Annotated[str, typer.Option(help="OpenRouter model slug")] = "meta-llama/llama-3.1-8b-instruct",
    embed: Annotated[bool, typer.Option("--embed", help="an embeddings job")] = False,
    completion: Annotated[bool, typer.Option("--completion", help="a text completion job")] = False,
    session: Annotated[str | None, typer.Option(help="session id (Phoenix Sessions)")] = None,
    user: Annotated[str | None, typer.Option(help="user id")] = None,
    metadata: Annotated[list[str] | None, typer.Option(help="key=value, repeatable")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="tag, repeatable")] = None,
    body: Annotated[str | None, typer.Option(help="extra JSON merged into the request body")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait and print the answer")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait with --wait")] = 300.0,
) -> None:
    """Queue one job. Prints the job id, or with --wait the answer (exit 1 if the job failed)."""
    from producer import Producer

    if embed and completion:
        err.print("[red]--embed and --completion are exclusive[/red]")
        raise typer.Exit(2)
    kind = JobKind.EMBEDDING if embed else JobKind.COMPLETION if completion else JobKind.CHAT
    request: dict[str, object] = {"model": model}
    if kind is JobKind.CHAT:
        request["messages"] = [{"role": "user", "content": prompt}]
    else:
        request["prompt" if kind is JobKind.COMPLETION else "input"] = prompt
    if body:
        try:
            request.update(json.loads(body))
        except (ValueError, TypeError) as exc:
            err.print(f"[red]--body is not a JSON object: {exc}[/red]")
            raise typer.Exit(2) from None
    try:
        job = Job(
            kind=kind,
            body=request,
            session_id=session,
            user_id=user,
            metadata=_pairs(metadata or [], "--metadata"),
            tags=tag or [],
        )
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    producer = Producer(_settings())
    try:
        if not wait:
            print(producer.submit(job).id)
            return
        try:
            result = producer.run(job, timeout=timeout)
        except TimeoutError as exc:
            err.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
        if not result.ok:
            error = result.error
            status = f" (HTTP {error.status_code})" if error and error.status_code else ""
            err.print(f"[red]job {result.job_id} failed{status}: {error.message if error else ''}[/red]")
            raise typer.Exit(1)
        print(result.text)
    finally:
        producer.close()


@app.command("fake-openrouter")
def fake_openrouter(
    port: Annotated[int, typer.Option()] = 8765,
    latency_ms: Annotated[float, typer.Option(help="added to every answer")] = 0.0,
) -> None:
    """Serve the local OpenRouter stand-in (what `make demo` uses without an API key)."""
    from routerq.fake_openrouter import serve

    serve("127.0.0.1", port, set(), latency_ms)


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="keep the stack running until Ctrl-C")] = True,
) -> None:
    """Start a local stack, run example jobs of each kind, print results and the Phoenix URL."""
    from routerq.demo import run_demo

    sys.exit(run_demo(keep=keep))


@app.command()
def down() -> None:
    """Stop a local stack that `routerq demo` left running."""
    from routerq.demo import stop_recorded

    stopped = stop_recorded()
    err.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop")


if __name__ == "__main__":
    app()
