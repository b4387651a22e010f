"""The `routerq` command line.

Commands import what they use inside their own body: `routerq status` should not pay for the worker's
openai client, nor `routerq worker` for the demo.
"""

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from routerq.core.batch_store import Batch, BatchStats, BatchStatus, Fallback, Via
from routerq.core.child_process import python_module
from routerq.core.errors import SettingsError
from routerq.core.jobs import Job, JobKind, JobResult
from routerq.core.printable import printable
from routerq.core.settings import Settings, load_settings

if TYPE_CHECKING:
    from routerq.core.export_counts import ExportCounts
    from routerq.core.rate_state import ModelRate
    from routerq.producer.batch_client import BatchClient
    from routerq.producer.batch_reader import BatchReader


BatchArg = Annotated[
    str,
    typer.Argument(
        metavar="BATCH", help="the batch id `routerq submit` printed (`routerq batches` lists them)"
    ),
]


def flag(*names: str, **kwargs: Any) -> Any:
    """A boolean option, listed in --help without a `<bool>` type."""
    return typer.Option(*names, metavar="", **kwargs)


app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="LLM jobs on a Redis queue, traced in Phoenix."
)
# `enqueue` without --model: a small, cheap model of the job's own kind (never a chat model for an
# embedding).
DEFAULT_MODELS = {
    JobKind.CHAT: "meta-llama/llama-3.1-8b-instruct",
    JobKind.COMPLETION: "mistralai/mistral-7b-instruct",
    JobKind.EMBEDDING: "openai/text-embedding-3-small",
}


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        print(f"routerq {version('routerq')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, flag("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """LLM jobs on a Redis queue, traced in Phoenix. Settings come from the environment (REDIS_URL,
    OPENROUTER_API_KEY, PHOENIX_COLLECTOR_ENDPOINT, ...: see the README's settings table)."""


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
    concurrency: Annotated[
        int,
        typer.Option("--concurrency", "-c", min=1, help="upstream calls in flight, all processes together"),
    ] = 64,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
    processes: Annotated[
        int | None,
        typer.Option(
            min=1, help="processes sharing the concurrency, each one event loop (default: 1 per core)"
        ),
    ] = None,
    supervise: Annotated[bool, flag(help="restart the worker if it dies on its own")] = True,
) -> None:
    """Run a worker that takes jobs from Redis and calls OpenRouter."""
    from routerq.core.errors import PreflightError
    from routerq.worker.upkeep.run import run_worker
    from routerq.worker.upkeep.supervisor import SUPERVISED_ENV, default_processes, exec_supervisor, split
    from routerq.worker.upstream.preflight import check_api_key

    processes = processes or default_processes(concurrency)
    if processes > concurrency:
        raise _fail("routerq worker: --processes cannot exceed --concurrency", 2)
    if processes > 1 and not supervise:
        raise _fail("routerq worker: --processes above 1 needs the supervisor (drop --no-supervise)", 2)
    settings = _settings()
    _require_redis(settings)  # a worker that cannot reach Redis at start says so at once; once running,
    # it rides out an outage
    if supervise and not os.environ.get(SUPERVISED_ENV):
        try:
            check_api_key(settings)
        except PreflightError as exc:
            raise _fail(f"routerq worker: {exc}", 2) from None
        argvs = [
            python_module("routerq.cli", "worker", "--concurrency", str(share), "--processes", "1",
                          "--loglevel", loglevel)
            for share in split(concurrency, processes)
        ]  # fmt: skip
        exec_supervisor(argvs)
    try:
        run_worker(settings, concurrency, loglevel)
    except PreflightError as exc:
        err.print(f"[red]routerq worker: {exc}[/red]")
        raise typer.Exit(2) from None


@app.command()
def enqueue(
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="the prompt, or the text to embed")],
    model: Annotated[
        str | None, typer.Option(help="OpenRouter model slug (default: one per kind of job, see --help)")
    ] = None,
    embed: Annotated[bool, flag("--embed", help="an embeddings job")] = False,
    completion: Annotated[bool, flag("--completion", help="a text completion job")] = False,
    session: Annotated[str | None, typer.Option(help="session id (Phoenix Sessions)")] = None,
    user: Annotated[str | None, typer.Option(help="user id")] = None,
    metadata: Annotated[list[str] | None, typer.Option(help="key=value, repeatable")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="tag, repeatable")] = None,
    body: Annotated[str | None, typer.Option(help="extra JSON merged into the request body")] = None,
    tier: Annotated[
        str | None,
        typer.Option(help="OpenRouter's service tier, e.g. flex: about half price, slower (service_tier)"),
    ] = None,
    wait: Annotated[bool, flag("--wait", help="wait and print the answer")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait with --wait")] = 300.0,
) -> None:
    """Queue one job. Prints the job id, or with --wait the answer (exit 1 if the job failed)."""
    from routerq.producer import Producer

    if embed and completion:
        err.print("[red]--embed and --completion are exclusive[/red]")
        raise typer.Exit(2)
    kind = JobKind.EMBEDDING if embed else JobKind.COMPLETION if completion else JobKind.CHAT
    request: dict[str, object] = {"model": model or DEFAULT_MODELS[kind]}
    if kind is JobKind.CHAT:
        request["messages"] = [{"role": "user", "content": prompt}]
    else:
        request["prompt" if kind is JobKind.COMPLETION else "input"] = prompt
    if tier:
        request["service_tier"] = tier
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
    settings = _settings()
    _require_redis(settings)
    producer = Producer(settings)
    try:
        if not wait:
            print(producer.submit(job).id)
            return
        try:
            result = producer.run(job, timeout=timeout, on_wait=_waiting(job.id, settings, timeout))
        except TimeoutError as exc:
            err.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
        _print_result(result)
    finally:
        producer.close()


def _waiting(job_id: str, settings: Settings, timeout: float) -> Callable[[str], None]:
    """Says on stderr why a waited-on job has no answer yet, and how long each side keeps at it."""

    def say(note: str) -> None:
        err.print(
            f"[yellow]job {job_id} waits: {escape(note)}. Workers keep retrying rate limits for up to "
            f"{settings.max_retry_time:g} s (ROUTERQ_MAX_RETRY_TIME); this command waits {timeout:g} s "
            "(--timeout), and stopping it does not stop the job.[/yellow]"
        )

    return say


def _print_result(result: JobResult) -> None:
    """The answer on stdout, or OpenRouter's error on stderr and exit 1."""
    if not result.ok:
        error = result.error
        status = f" (HTTP {error.status_code})" if error and error.status_code else ""
        err.print(f"[red]job {result.job_id} failed{status}: {error.message if error else ''}[/red]")
        raise typer.Exit(1)
    print(result.text)


NO_RESULT_EXIT_CODE = 4  # `routerq result` on a job that has no result yet
NO_SUCH_JOB_EXIT_CODE = 5  # `routerq result` on an id this Redis does not know (or no longer)


@app.command()
def result(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="the id `routerq enqueue` printed")],
    wait: Annotated[bool, flag("--wait", help="wait for the result if the job is still running")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait with --wait")] = 300.0,
) -> None:
    """Print a queued job's answer (exit 1 if it failed, 4 if it has no result yet, 5 if no such job)."""
    from routerq.producer import Producer

    settings = _settings()
    _require_redis(settings)
    producer = Producer(settings, tracing=False)
    if not producer.store.known(job_id):
        raise _fail(
            f"no such job: {job_id} (never queued on this Redis, or older than ROUTERQ_RESULT_TTL)",
            NO_SUCH_JOB_EXIT_CODE,
        )
    try:
        found = producer.result(job_id, timeout=timeout if wait else None)
    except TimeoutError as exc:
        raise _fail(str(exc), NO_RESULT_EXIT_CODE) from None
    if found is None:
        raise _fail(
            f"job {job_id} has no result yet: still queued or running (use --wait)", NO_RESULT_EXIT_CODE
        )
    _print_result(found)


def _batch_client(tracing: bool = False) -> "BatchClient":
    """Only `submit` traces (its span opens the batch's session); steering a batch needs neither
    Phoenix nor the time importing its exporter takes."""
    from routerq.producer.batch_client import BatchClient

    settings = _settings()
    _require_redis(settings)
    return BatchClient(settings, tracing=tracing)


def _batch_reader() -> "BatchReader":
    """Reading a batch (status, batches, results) needs Redis only: no Celery, no tracing imports."""
    from routerq.producer.batch_reader import BatchReader

    settings = _settings()
    _require_redis(settings)
    return BatchReader(settings)


def _require_redis(settings: Settings) -> None:
    """One quick look before anything else: a wrong REDIS_URL is one line at once, not a minute of
    reconnect attempts and a traceback."""
    import redis

    from routerq.core.redis_client import describe

    try:
        redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3).ping()
    except redis.RedisError as exc:
        raise _fail(f"cannot reach Redis at {describe(settings.redis_url)} (REDIS_URL): {exc}") from None


@contextmanager
def _batch_errors() -> Iterator[None]:
    """A batch command's known failures (unknown id, wrong state) as one clear line and exit 1."""
    from routerq.core.errors import BatchError

    try:
        yield
    except BatchError as exc:
        raise _fail(str(exc)) from None


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]{message}[/red]")
    return typer.Exit(code)


def _progress_until_done(client: "BatchReader", batch_id: str) -> Batch:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(batch_id, total=None, detail="")

        def show(batch: Batch) -> None:
            detail = (
                f"ok {batch.succeeded} failed {batch.failed} cancelled {batch.cancelled} ${batch.cost:.6f}"
            )
            progress.update(task, total=batch.total, completed=batch.done, detail=detail)

        return client.wait(batch_id, show)


@app.command()
def submit(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", exists=True, dir_okay=False, help="OpenAI Batch input (.jsonl)")
    ],
    name: Annotated[str, typer.Option(help="a name for the batch")] = "",
    metadata: Annotated[list[str] | None, typer.Option(help="key=value, repeatable")] = None,
    model: Annotated[str | None, typer.Option(help="model for lines whose body has none")] = None,
    session: Annotated[str | None, typer.Option(help="Phoenix session (default: the batch id)")] = None,
    user: Annotated[str | None, typer.Option(help="user id for every line")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="same key + same file = same batch")] = None,
    max_cost: Annotated[float | None, typer.Option(help="pause the batch when its spend reaches USD")] = None,
    tier: Annotated[
        str | None,
        typer.Option(help="OpenRouter's service tier, e.g. flex: about half price, slower (service_tier)"),
    ] = None,
    via: Annotated[
        Via,
        typer.Option(
            help="live: each line a live call; batch: OpenRouter's Batch API, ~half price, within 24 h"
        ),
    ] = Via.LIVE,
    fallback: Annotated[
        Fallback,
        typer.Option(
            help="with --via batch, where a line OpenRouter's batch did not answer goes: none (another "
            "upstream batch) or live (a live call at once, live price)"
        ),
    ] = Fallback.NONE,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="show progress until the batch ends (exit 1: lines failed; 3: paused)"),
    ] = False,
) -> None:
    """Validate a whole batch file, then enqueue all of its lines. Prints the batch id last on stdout."""
    from routerq.core.errors import BatchError, BatchFileError

    client = _batch_client(tracing=True)
    try:
        submitted = client.submit(
            file,
            name=name,
            metadata=_pairs(metadata or [], "--metadata"),
            model=model,
            session_id=session,
            user_id=user,
            idempotency_key=idempotency_key,
            max_cost=max_cost,
            via=via,
            fallback=fallback,
            tier=tier,
        )
    except BatchFileError as exc:
        for report_line in exc.validation.report(str(file)):
            err.print(report_line, markup=False)
        raise _fail(f"{file}: {exc.validation.error_count} bad line(s); nothing was enqueued") from None
    except BatchError as exc:
        raise _fail(str(exc)) from None
    finally:
        telemetry_flush()
    batch = submitted.batch
    verb = "exists already (same idempotency key)" if submitted.existing else f"enqueued {batch.total} lines"
    err.print(f"batch {batch.id}: {verb}")
    if wait:
        batch = _progress_until_done(client, batch.id)
        err.print(
            f"batch {batch.id} {batch.status.value}: {batch.succeeded} succeeded, {batch.failed} failed"
        )
        _say_if_paused(batch)
    print(batch.id)
    if wait and batch.status is BatchStatus.PAUSED:
        raise typer.Exit(PAUSED_EXIT_CODE)
    if wait and (batch.failed or batch.cancelled):
        raise typer.Exit(1)


PAUSED_EXIT_CODE = 3  # --wait / --watch on a batch that paused: it waits for `routerq resume`, not time


def _say_if_paused(batch: Batch) -> None:
    if batch.status is BatchStatus.PAUSED:
        err.print(f"batch {batch.id} is paused ({batch.reason}); `routerq resume {batch.id}` continues it")


def telemetry_flush() -> None:
    from routerq.core import telemetry

    telemetry.flush()


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value / 1000:.1f} s" if value >= 10_000 else f"{value:.0f} ms")


def _percentiles(values: dict[float, float | None]) -> str:
    return ", ".join(f"p{round(q * 100)} {_ms(v)}" for q, v in values.items())


def _traces(batch: Batch, export: "ExportCounts") -> str:
    """How much of the batch Phoenix holds, and whether any span failed to get there."""
    decided = batch.traced + batch.sampled_out
    if not decided:
        return "not traced"
    line = f"{batch.traced} of {decided} lines in Phoenix"
    if batch.sampled_out:
        line += f" (every failed, retried or slow line; {batch.sampled_out} successes sampled out)"
    if export.dropped:
        line += (
            f"; WARNING: workers could not deliver {export.dropped} span(s) "
            f"({export.refused} refused by Phoenix, {export.queue_full} over a full queue)"
        )
    return line


def _rates(rates: list["ModelRate"]) -> list[str]:
    """Each model the limiter paces: its discovered rate and the share of its calls upstream refused;
    and a provider's share refused at any pace (not a limit: not paced for)."""
    return [
        f"rate       {printable(r.model, 100)}: "
        + (f"{r.rate:.1f} calls/s discovered" if r.rate is not None else _unpaced(r))
        + f", {r.refused} of {r.granted} calls refused ({r.refused_share:.1%})"
        + (f"; about {r.noise:.0%} refused at any pace (a flaky provider, not a limit)" if r.noise else "")
        for r in rates
        if r.rate is not None or r.refused
    ]


def _unpaced(rate: "ModelRate") -> str:
    return "not paced" if rate.noise else "not paced (never refused)"


def _describe(
    batch: Batch,
    stats: BatchStats,
    export: "ExportCounts",
    upstream: dict[str, int],
    rates: list["ModelRate"],
) -> str:
    now = time.time()
    started = batch.in_progress_at or batch.created_at
    elapsed = (batch.completed_at or batch.cancelled_at or now) - started
    rate = batch.done / elapsed if elapsed > 0 else 0.0
    remaining = batch.total - batch.done
    eta = f"{remaining / rate:.0f} s" if rate > 0 and not batch.status.final else "-"
    lines = [
        f"batch      {batch.id}" + (f" ({printable(batch.name)})" if batch.name else ""),
        f"status     {batch.status.value}" + (f": {printable(batch.reason, 500)}" if batch.reason else ""),
        f"lines      {batch.total} total: {batch.queued} queued, "
        + (f"{batch.held} held by workers, " if batch.held else "")
        + f"{batch.running} running, "
        f"{batch.succeeded} succeeded, {batch.failed} failed, {batch.cancelled} cancelled"
        + (f", {batch.parked} parked" if batch.parked else ""),
        f"tokens     {batch.prompt_tokens} in, {batch.completion_tokens} out",
        f"cost       ${batch.cost:.6f}"
        + (f" of a ${batch.max_cost:g} budget" if batch.max_cost else "")
        + (
            f" (${batch.cost_after_cancel:.6f} of it billed for OpenRouter batches that ended after "
            "the cancel)"
            if batch.cost_after_cancel
            else ""
        ),
        f"throughput {rate:.1f} lines/s, ETA {eta}",
        f"latency    {_percentiles(stats.latency_ms)}; queue wait {_percentiles(stats.queue_wait_ms)}",
        f"retries    {batch.retries}",
        f"traces     {_traces(batch, export)}",
        *_rates(rates),
    ]
    if batch.via is Via.BATCH:
        states = ", ".join(f"{n} {status}" for status, n in sorted(upstream.items())) or "none yet"
        lines.insert(2, f"via batch  {sum(upstream.values())} upstream batches: {states}")
    return "\n".join(lines)


@app.command()
def status(
    batch_id: BatchArg,
    watch: Annotated[
        bool, flag("--watch", help="refresh until the batch ends or pauses (exit 3 when paused)")
    ] = False,
    as_json: Annotated[bool, flag("--json", help="OpenAI-style batch object")] = False,
) -> None:
    """State, counts, tokens, cost, throughput and ETA of a batch."""
    client = _batch_reader()
    with _batch_errors():
        if watch and not as_json:
            _progress_until_done(client, batch_id)
        batch = client.get(batch_id)
        described = (
            ""
            if as_json
            else _describe(
                batch,
                client.stats(batch_id),
                client.span_export(),
                client.upstream_batches(batch_id),
                client.model_rates(),
            )
        )
    print(json.dumps(batch.openai_object(), indent=2) if as_json else described)
    if watch:
        _say_if_paused(batch)
        if batch.status is BatchStatus.PAUSED:
            raise typer.Exit(PAUSED_EXIT_CODE)


@app.command()
def batches(limit: Annotated[int, typer.Option(help="how many")] = 20) -> None:
    """List batches, newest first."""
    client = _batch_reader()
    for batch in client.recent(limit):
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(batch.created_at))
        print(
            f"{batch.id}  {batch.status.value:<11} {batch.done:>7}/{batch.total:<7} {created}  "
            + printable(batch.name)
        )


@app.command()
def results(
    batch_id: BatchArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="output .jsonl")],
    errors: Annotated[Path | None, typer.Option("--errors", help="failed lines go here instead")] = None,
) -> None:
    """Write OpenAI Batch output lines in the input file's order."""
    client = _batch_reader()
    with _batch_errors():
        batch = client.get(batch_id)
    with output.open("wb") as out, errors.open("wb") if errors else nullcontext() as err_file:
        written = client.write_results(batch, out, err_file)
    err.print(f"{written.written} succeeded and {written.errors} failed line(s) written")
    if written.unfinished:
        err.print(
            f"batch is {batch.status.value}: {written.unfinished} line(s) not finished yet, not written"
        )


@app.command()
def cancel(batch_id: BatchArg) -> None:
    """Stop a batch: queued lines are never sent upstream; running ones finish."""
    with _batch_errors():
        batch = _batch_client().cancel(batch_id)
    err.print(f"batch {batch.id} is {batch.status.value}")


@app.command()
def resume(
    batch_id: BatchArg,
    max_cost: Annotated[float | None, typer.Option(help="a new budget in USD")] = None,
) -> None:
    """Continue a paused batch once its key, credit or budget is fixed."""
    with _batch_errors():
        count = _batch_client().resume(batch_id, max_cost)
    err.print(f"batch {batch_id} resumed; {count} parked line(s) re-enqueued")


@app.command()
def retry(batch_id: BatchArg) -> None:
    """Re-run only the failed lines of a batch."""
    with _batch_errors():
        count = _batch_client().retry(batch_id)
    err.print(f"re-enqueued {count} failed line(s) of {batch_id}")


@app.command()
def embed(
    file: Annotated[
        Path,
        typer.Argument(metavar="FILE", exists=True, dir_okay=False, help="JSONL or CSV with ids and texts"),
    ],
    model: Annotated[str, typer.Option(help="embedding model slug")],
    output: Annotated[Path, typer.Option("-o", "--output", help="vectors .jsonl (or .parquet)")],
    id_field: Annotated[str, typer.Option(help="the id column")] = "id",
    text_field: Annotated[str, typer.Option(help="the text column")] = "text",
    inputs_per_request: Annotated[int, typer.Option(min=1, max=2048, help="texts per request")] = 128,
    dimensions: Annotated[int | None, typer.Option(help="ask the model for this many dimensions")] = None,
    via: Annotated[
        Via,
        typer.Option(
            help="live: each request a live call; batch: OpenRouter's Batch API, ~half price, within 24 h"
        ),
    ] = Via.LIVE,
) -> None:
    """Embedding backfill. Re-running after an interruption sends only texts without a stored vector."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from routerq.core.embed_store import EmbedRun
    from routerq.core.errors import EmbedInputError
    from routerq.producer.embed_client import EmbedClient

    settings = _settings()
    _require_redis(settings)
    client = EmbedClient(settings)
    try:
        plan = client.start(
            file,
            model,
            id_field=id_field,
            text_field=text_field,
            per_request=inputs_per_request,
            dimensions=dimensions,
            via=via,
        )
    except EmbedInputError as exc:
        for error in exc.errors:
            err.print(error.render(str(file)), markup=False)
        if exc.count > len(exc.errors):
            err.print(f"... and {exc.count - len(exc.errors)} more bad row(s)")
        raise _fail(f"{file}: {exc.count} bad row(s); nothing was enqueued") from None
    finally:
        telemetry_flush()
    run = plan.run
    err.print(
        f"{run.id}: {run.total} texts, {run.total - plan.missing} already embedded, "
        f"{plan.missing} to embed in {plan.requests} request(s)"
        + (f", sent as {plan.upstream_batches} OpenRouter batch(es)" if via is Via.BATCH else "")
    )
    columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("embed", total=run.total)

        def show(current: EmbedRun) -> None:
            progress.update(task, completed=current.done)

        run = client.wait(run.id, show)
    written = client.write(run, output)
    err.print(f"{written} vectors written to {output} (cost ${run.cost:.6f})")
    if run.failed:
        raise _fail(f"{run.failed} text(s) failed; run the same command again to retry them")


@app.command("fake-openrouter")
def fake_openrouter(
    port: Annotated[int, typer.Option(help="port to listen on (127.0.0.1 only)")] = 8765,
    latency_ms: Annotated[float, typer.Option(help="added to every answer")] = 0.0,
) -> None:
    """Serve the local OpenRouter stand-in (what `make demo` uses without an API key)."""
    from routerq.devstack.fake_openrouter import serve

    serve("127.0.0.1", port, set(), latency_ms)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    no_auth: Annotated[
        bool, flag("--no-auth", help="serve without bearer tokens (loopback addresses only)")
    ] = False,
) -> None:
    """OpenAI's Files and Batches API over routerq: the official clients of any language submit and
    follow batches with only base_url and api_key changed. Reads ROUTERQ_API_KEYS (comma-separated
    bearer tokens), ROUTERQ_FILES_DIR and ROUTERQ_MAX_UPLOAD_MB, and the usual REDIS_URL and Phoenix
    settings."""
    from routerq.api.server import serve as run_server

    settings = _settings()
    _require_redis(settings)
    try:
        run_server(settings, host, port, no_auth)
    except SettingsError as exc:
        raise _fail(str(exc), 2) from None


@app.command()
def demo(
    keep: Annotated[bool, flag(help="keep the stack running until Ctrl-C")] = True,
) -> None:
    """Start a local stack, run example jobs of each kind, print results and the Phoenix URL."""
    from routerq.devstack.demo import run_demo

    sys.exit(run_demo(keep=keep))


@app.command()
def down() -> None:
    """Stop a local stack that `routerq demo` left running."""
    from routerq.devstack.demo import stop_recorded

    stopped = stop_recorded()
    err.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop")


if __name__ == "__main__":
    app()
