"""The task bodies: a single job, one line of a batch, one request of an embedding backfill.

Each is a coroutine on the process's event loop (worker.pool), runs the shared attempt
(worker.attempt) and records its outcome in the matching store; a delivery counter
(worker.deliveries) bounds messages that kill their worker process.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

from celery import Celery
from openinference.semconv.trace import SpanAttributes
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from routerq.core import telemetry
from routerq.core.batch_format import error_line, output_line
from routerq.core.batch_store import Batch, BatchStatus, Go, LineStart, Outcome, Recorded
from routerq.core.broker import EMBED_TASK_NAME, LINE_TASK_NAME, TASK_NAME
from routerq.core.embed_store import EmbedRun
from routerq.core.errors import JobFailedError
from routerq.core.job_chain import JobGo
from routerq.core.jobs import Job, JobError, JobKind, JobResult
from routerq.core.rate_state import model_rates_async
from routerq.core.settings import VISIBILITY_SLACK
from routerq.core.spans import (
    ATTEMPT,
    BATCH_ID,
    BATCH_LINE,
    OUTCOME,
    chain_attributes,
    chain_kind,
    context_attributes,
)
from routerq.worker.execution.attempt import (
    BUDGET_WAIT_S,
    Attempt,
    Retrying,
    attempt_attributes,
    attempt_or_retry,
    failed_without_call,
    replay_call,
)
from routerq.worker.execution.deliveries import delivery_key, over_delivered, poison_error
from routerq.worker.execution.pool import DRAINING, Delivery
from routerq.worker.execution.republish import republish
from routerq.worker.execution.runtime import Runtime
from routerq.worker.signals import Deferred, Halted
from routerq.worker.tracing.batch_summary import write_summary
from routerq.worker.tracing.line_trace import LineTrace
from routerq.worker.tracing.tail_sampler import sampler
from routerq.worker.upstream.retry import Action, Tries

log = logging.getLogger(__name__)


class Skipped(StrEnum):
    """Why a delivered line was not sent upstream."""

    MISSING = "missing"  # the batch expired, or never existed
    SUCCEEDED = "succeeded"  # a redelivery of a line that already succeeded
    CANCELLED = "cancelled"
    PARKED = "parked"  # set aside while its batch is paused


async def run_job(
    rt: Runtime,
    delivery: Delivery,
    payload: dict[str, Any],
    tries: dict[str, float] | None = None,
    gen: str = "",
) -> dict[str, Any]:
    """A single job, in the trace its producer started: `run/routerq.run_job` under the publish span.
    Its trace is kept or not as the producer decided (parent-based), never split. `gen` names the
    job's message generation (routerq.core.job_chain): only the current one may call."""
    job = Job.model_validate(payload)
    with _consumer_span(delivery, job.project) as span:
        stored = await rt.store.get(job.id)
        if stored is not None:
            log.info("job %s already has its outcome (%s); not calling upstream again", job.id, stored.status)
            return {"job_id": job.id, "status": stored.status}
        guard = _JobGuard(rt, job.id, gen, delivery_key(delivery, job.id))
        try:
            attempt = await attempt_or_retry(
                rt, delivery, job=job, tries=Tries.load(tries), args=[payload],
                guard=guard, before_retry=guard.next_message, carry=guard.carry,
            )  # fmt: skip
        except Retrying as retrying:
            _retrying(span, job, Tries.load(tries), retrying.attempt)
            return {"job_id": job.id, "status": "retrying"}
        except Halted as halted:
            if halted.verdict != POISONED:
                return await _halted_job(rt, job, halted)
            attempt = Attempt(
                failed_without_call(job, poison_error(guard.deliveries), Tries.load(tries).attempt), None
            )
        result = attempt.result
        span.set_attributes(attempt_attributes(job, Tries.load(tries), attempt))
        _end_status(span, result)
        await rt.store.put(result)
        if not result.ok:
            log.warning("%s", JobFailedError(result))
        return {"job_id": job.id, "status": result.status}


class _JobGuard:
    """A single job's call guard (execution.attempt.Guard): one live message, one call at a time, no
    call once the job has its outcome (routerq.core.job_chain)."""

    def __init__(self, rt: Runtime, job_id: str, generation: str, delivery_key: str) -> None:
        self._rt, self._job_id, self._generation = rt, job_id, generation
        self._delivery_key = delivery_key
        self.deliveries = 0
        self._owner = uuid.uuid4().hex
        self._early = False  # this run came before the job's countdown was over: it waits, it says nothing
        self.carry: dict[str, Any] = {}  # the next message's kwargs: its generation

    async def before_call(self) -> None:
        hold_s = self._rt.settings.job_time_limit + VISIBILITY_SLACK
        verdict, value = await self._rt.chains.go(
            self._job_id, self._generation, self._owner, hold_s, self._delivery_key
        )
        if verdict is JobGo.WAIT:
            self._early = True
            raise Deferred(value / 1000, "the job's countdown, or another run of it calling")
        if verdict is not JobGo.GO:
            raise Halted(verdict)
        self.deliveries = value
        if value > self._rt.settings.max_deliveries:  # its worker died this often while calling
            raise Halted(POISONED)

    async def pause(self, reason: str) -> None:
        """A single job has no batch to pause: its failure says why (a revoked key, no credits)."""

    async def next_message(self, delay: float, why: str) -> None:
        note = "" if self._early else f"{why}; next try in {delay:.0f} s"
        self.carry["gen"] = await self._rt.chains.advance(self._job_id, delay, note)


POISONED = 9  # a Halted verdict of the job guard: the message was delivered too often (_JobGuard)


async def _halted_job(rt: Runtime, job: Job, halted: Halted) -> dict[str, Any]:
    """A run that must not call: the job has its outcome, or this message is a stale copy."""
    if halted.verdict == JobGo.FINAL:
        stored = await rt.store.get(job.id)
        return {"job_id": job.id, "status": stored.status if stored else "unknown"}
    log.info("job %s: a stale copy of its message ended without a call", job.id)
    return {"job_id": job.id, "status": "stale_copy"}


def _retrying(span: trace.Span, job: Job, tries: Tries, attempt: Attempt) -> None:
    """A run that ends in a retry: its span is this attempt's, ERROR with the error it met."""
    span.set_attributes(attempt_attributes(job, tries, attempt))
    span.set_attribute(SpanAttributes.OUTPUT_VALUE, "retrying")
    _end_status(span, attempt.result)


def _end_status(span: trace.Span, result: JobResult) -> None:
    if result.ok:
        span.set_status(Status(StatusCode.OK))
    else:
        span.set_status(Status(StatusCode.ERROR, result.error.message if result.error else result.status))


async def run_lines(
    rt: Runtime,
    delivery: Delivery,
    batch_id: str,
    indexes: list[int],
    enqueued_at: float,
    tries: dict[str, float] | None = None,
    traceparent: str | None = None,
) -> dict[str, Any]:
    """Lines of one batch that travelled in one message, run concurrently, each call taking one of
    the process's call slots (worker.attempt). The message is acknowledged once every line has an
    outcome, is parked, or was re-published for a retry; a redelivered message runs only the lines
    without an outcome."""
    if DRAINING.is_set():  # a warm shutdown began before this message started: back on the queue at once
        for _ in indexes:
            delivery.lent.line_ended()
        kwargs = {"tries": tries, "traceparent": traceparent}
        await republish(rt, delivery, [batch_id, indexes, enqueued_at], kwargs)
        log.info(
            "batch %s: %d line(s) not started before shutdown returned to the queue", batch_id, len(indexes)
        )
        return {"batch_id": batch_id, "lines": len(indexes), "returned": len(indexes)}
    starts = await rt.batches.begin(batch_id, indexes)

    async def one(index: int, start: LineStart) -> str:
        try:
            return await run_line(
                rt, delivery, batch_id, index, start, enqueued_at, Tries.load(tries), traceparent
            )
        finally:
            delivery.lent.line_ended()

    statuses = await asyncio.gather(
        *(one(i, s) for i, s in zip(indexes, starts, strict=True)), return_exceptions=True
    )
    for index, status in zip(indexes, statuses, strict=True):
        if isinstance(status, BaseException):
            log.error(
                "batch %s line %d: %s: %s", batch_id, index, type(status).__name__, status, exc_info=status
            )
    return {"batch_id": batch_id, "lines": len(indexes)}


async def run_line(
    rt: Runtime,
    delivery: Delivery,
    batch_id: str,
    index: int,
    start: LineStart,
    enqueued_at: float,
    tries: Tries,
    traceparent: str | None,
) -> str:
    """One batch line in its own trace (worker.line_trace): the root is written when the line ends,
    with its outcome; every attempt's call is a child of it, whichever process made it."""
    try:
        with LineTrace(sampler(), traceparent, enqueued_at) as line_trace:
            result = await _run_line(rt, delivery, line_trace, batch_id, index, start, enqueued_at, tries)
    except Retrying:  # re-published with a countdown (or, at shutdown, at once): it goes on elsewhere
        return "retrying"
    return result.value if isinstance(result, Skipped) else result.status


async def _run_line(
    rt: Runtime,
    delivery: Delivery,
    line_trace: LineTrace,
    batch_id: str,
    index: int,
    start: LineStart,
    enqueued_at: float,
    tries: Tries,
) -> JobResult | Skipped:
    """The line's result when it was tried, or why it was not."""
    store = rt.batches
    line_trace.attributes.update(
        {**chain_kind(), BATCH_ID: batch_id, BATCH_LINE: index, ATTEMPT: tries.attempt}
    )
    batch, line = start.batch, start.line
    if batch is None or line is None:
        return await _missing(rt, line_trace, batch_id, index)
    project = batch.project
    if start.outcome is Outcome.SUCCEEDED:
        await store.unmark_running(batch_id, index)
        log.info("batch %s line %d already succeeded; not calling upstream again", batch_id, index)
        line_trace.finish(output="already succeeded: not sent again", ok=True, always=False, project=project)
        return Skipped.SUCCEEDED
    if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED, BatchStatus.FAILED):
        return await _cancelled(
            rt, line_trace, batch, index, line_job(batch, index, line, enqueued_at), batch.status.value
        )
    if batch.status is BatchStatus.PAUSED and await store.park(batch_id, index):
        line_trace.finish(output=f"parked: batch paused ({batch.reason})", always=True, project=project)
        return Skipped.PARKED

    job = line_job(batch, index, line, enqueued_at)
    line_trace.attributes.update(chain_attributes(job.prompt_text))
    guard = _LineGuard(rt, batch_id, index, delivery_key(delivery, f"{batch_id}-{index}"))
    # A first try whose success the budget would drop is called untraced, and traced by a replay only
    # if the line turns out to need its trace (worker.call_record); a retried line is always kept.
    record = tries.attempt == 1 and not tries.waits and line_trace.would_drop()

    async def trace_the_call(attempt: Attempt) -> None:
        await line_trace.replay(attempt.recording, lambda: replay_call(rt, job))

    try:
        attempt = await attempt_or_retry(
            rt,
            delivery,
            job=job,
            tries=tries,
            args=[batch_id, [index], enqueued_at],
            before_retry=lambda _delay, _why: store.unmark_running(batch_id, index),
            carry={"traceparent": line_trace.traceparent},
            guard=guard,
            record=record,
        )
    except Retrying as retrying:
        await trace_the_call(retrying.attempt)
        raise
    except Halted as halted:
        if halted.verdict == Go.MISSING:
            return await _missing(rt, line_trace, batch_id, index)
        if halted.verdict == Go.STOPPED:
            return await _cancelled(rt, line_trace, batch, index, job, "cancelled")
        if halted.verdict == Go.PARKED:
            line_trace.finish(output="parked: batch paused", always=True, project=project)
            return Skipped.PARKED
        attempt = Attempt(failed_without_call(job, poison_error(guard.deliveries), tries.attempt), None)
    except Exception as exc:  # a bug or an outage of ours: record it, never drop the line silently
        result = failed_without_call(job, JobError(code="internal_error", message=repr(exc)), tries.attempt)
        await store.record(batch_id, index, Outcome.FAILED, output_line(job.custom_id or "", result), result)
        raise
    result = attempt.result
    line_trace.attributes.update(attempt_attributes(job, tries, attempt))
    decision = attempt.decision
    # the guard paused the batch already: set the line aside
    if decision is not None and decision.action is Action.PAUSE and await store.park(batch_id, index):
        await trace_the_call(attempt)
        line_trace.finish(output=f"parked: {decision.reason}", always=True, project=project)
        return Skipped.PARKED
    text = result.text if result.ok else (result.error.message if result.error else result.status)
    retries = tries.attempt - 1 + tries.waits
    latency = (result.finished_at or 0.0) - (result.started_at or 0.0)
    must_keep = (
        not result.ok or retries > 0 or attempt.limited or await rt.slow_lines.is_slow(batch_id, latency)
    )
    kept = line_trace.decide(must_keep, unwritten_calls=1 if attempt.recording else 0)
    if kept:
        await trace_the_call(attempt)
    traced = line_trace.finish(
        output=text, error=None if result.ok else text, ok=result.ok, kept=kept, project=project
    )
    if traced:
        result.trace_id = line_trace.trace_id_hex
    outcome = Outcome.SUCCEEDED if result.ok else Outcome.FAILED
    line_out = output_line(job.custom_id or "", result)
    await _record(rt, batch_id, index, outcome, line_out, result, line_trace, traced, retries)
    if not result.ok:
        log.warning("batch %s line %d: %s", batch_id, index, JobFailedError(result))
    return result


class _LineGuard:
    """A batch line's call guard (worker.attempt.Guard): the batch's state right before the call."""

    def __init__(self, rt: Runtime, batch_id: str, index: int, delivery_key: str) -> None:
        self._rt, self._batch_id, self._index, self._delivery_key = rt, batch_id, index, delivery_key
        self.deliveries = 0

    async def before_call(self) -> None:
        verdict = await self._rt.batches.go(self._batch_id, self._index, self._delivery_key)
        if verdict == Go.OVER_BUDGET:
            raise Deferred(BUDGET_WAIT_S, "batch budget")
        self.deliveries = verdict
        if verdict < 0 or verdict > self._rt.settings.max_deliveries:
            raise Halted(verdict)

    async def pause(self, reason: str) -> None:
        await self._rt.batches.pause(self._batch_id, reason)


async def _missing(rt: Runtime, line_trace: LineTrace, batch_id: str, index: int) -> Skipped:
    await rt.batches.unmark_running(batch_id, index)
    log.warning("batch %s line %d has expired or never existed; dropping it", batch_id, index)
    line_trace.finish(output="batch expired or never existed", always=True)
    return Skipped.MISSING


async def _cancelled(
    rt: Runtime, line_trace: LineTrace, batch: Batch, index: int, job: Job, status: str
) -> Skipped:
    """A line of a cancelled (or failed) batch is recorded as cancelled without a call. Its trace, when
    the budget keeps it, is in the batch's session with its input, says it was cancelled, and is
    neither OK nor an error (UNSET): it never ran. It counts as neither traced nor sampled out."""
    message = f"batch is {status}; line not sent upstream"
    line_out = error_line(job.custom_id or "", "batch_cancelled", message)
    line_trace.attributes.update(
        {
            **chain_attributes(job.prompt_text),
            **context_attributes(job),
            OUTCOME: Outcome.CANCELLED.name.lower(),
        }
    )
    line_trace.finish(output=message, always=False, project=batch.project)
    await rt.batches.record(batch.id, index, Outcome.CANCELLED, line_out, None)
    await summary_if_ended(rt, batch.id, Recorded.STORED)
    return Skipped.CANCELLED


async def _record(
    rt: Runtime,
    batch_id: str,
    index: int,
    outcome: Outcome,
    line_out: dict[str, Any],
    result: JobResult | None,
    line_trace: LineTrace,
    traced: bool,
    retries: int,
) -> None:
    """Store the outcome; the line that ends its batch writes the batch's summary trace."""
    tracing = line_trace.tracing
    recorded = await rt.batches.record(
        batch_id, index, outcome, line_out, result, traced=traced if tracing else None, retries=retries
    )
    await summary_if_ended(rt, batch_id, recorded)


async def summary_if_ended(rt: Runtime, batch_id: str, recorded: Recorded) -> None:
    """The batch summary trace, written by whichever outcome ended the batch."""
    current = sampler()
    if recorded is Recorded.ENDED_BATCH and current is not None:
        batch = await rt.batches.get(batch_id)
        if batch is not None:
            rates = await model_rates_async(rt.redis)
            write_summary(current, batch, await rt.batches.stats(batch_id), rates)


async def run_embed(
    rt: Runtime,
    delivery: Delivery,
    run_id: str,
    indexes: list[int],
    enqueued_at: float,
    tries: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One embeddings request for many texts; vectors are stored as raw float32, never as JSON text."""
    run = await rt.embeddings.get(run_id)
    if run is None:
        log.warning("embedding run %s has expired; dropping its request", run_id)
        return {"run": run_id, "stored": 0}
    with _consumer_span(delivery, run.project) as span:
        return await _run_embed(rt, delivery, span, run, indexes, enqueued_at, Tries.load(tries))


async def _run_embed(
    rt: Runtime,
    delivery: Delivery,
    span: trace.Span,
    run: EmbedRun,
    indexes: list[int],
    enqueued_at: float,
    tries: Tries,
) -> dict[str, Any]:
    run_id = run.id
    todo = await rt.embeddings.claim(run_id, indexes, owner=delivery.id)
    if not todo:
        return {"run": run_id, "stored": 0}
    body: dict[str, Any] = {
        "model": run.model,
        "input": await rt.embeddings.texts(run_id, todo),
        "encoding_format": "base64",
    }
    if run.dimensions:
        body["dimensions"] = run.dimensions
    job = Job(
        id=f"{run_id}-{todo[0]}",
        kind=JobKind.EMBEDDING,
        body=body,
        session_id=run_id,
        metadata={"embed_run": run_id, "input_file": run.input_file},
        enqueued_at=enqueued_at,
    )
    deliveries = await over_delivered(rt, delivery, job.id)
    if deliveries:
        await rt.embeddings.record_failure(run_id, todo)
        log.warning("%s", JobFailedError(failed_without_call(job, poison_error(deliveries), tries.attempt)))
        return {"run": run_id, "stored": 0}
    try:
        attempt = await attempt_or_retry(
            rt, delivery, job=job, tries=tries, args=[run_id, indexes, enqueued_at]
        )
    except Retrying as retrying:
        _retrying(span, job, tries, retrying.attempt)
        return {"run": run_id, "stored": 0, "status": "retrying"}
    result = attempt.result
    span.set_attributes(attempt_attributes(job, tries, attempt))
    _end_status(span, result)
    if not result.ok or result.response is None:
        await rt.embeddings.record_failure(run_id, todo)
        log.warning("%s", JobFailedError(result))
        return {"run": run_id, "stored": 0}
    vectors = {todo[item["index"]]: base64.b64decode(item["embedding"]) for item in result.response["data"]}
    usage = result.usage
    tokens, cost = (usage.prompt_tokens, usage.cost or 0.0) if usage else (0, 0.0)
    return {"run": run_id, "stored": await rt.embeddings.store_vectors(run_id, vectors, tokens, cost)}


def line_job(batch: Batch, index: int, line: dict[str, Any], enqueued_at: float) -> Job:
    """A batch line as a job: the batch is its session, and metadata says where the line came from."""
    metadata = {
        **batch.metadata,
        "batch_id": batch.id,
        "batch_name": batch.name,
        "custom_id": line["custom_id"],
    }
    return Job(
        id=f"{batch.id}-{index}",
        kind=JobKind(line["kind"]),
        body=line["body"],
        session_id=batch.session_id or batch.id,
        user_id=batch.user_id,
        metadata=metadata,
        enqueued_at=enqueued_at,
        batch_id=batch.id,
        custom_id=line["custom_id"],
    )


@contextmanager
def _consumer_span(delivery: Delivery, project: str | None) -> Iterator[trace.Span]:
    """The worker's span of a single job or embedding request, under the producer's publish span
    (as OpenTelemetry's Celery instrumentation would make it, were Celery's tracer running the task).
    Its spans go to Phoenix whole, in the producer's project."""
    current = sampler()
    trace_id: int | None = None
    try:
        with telemetry.tracer().start_as_current_span(
            f"run/{delivery.task}",
            context=propagate.extract(delivery.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                **chain_kind(),  # Phoenix shows a span without an OpenInference kind as "unknown"
                "celery.action": "run",
                "celery.task_name": delivery.task,
                "messaging.message.id": delivery.id,
            },
        ) as span:
            trace_id = span.get_span_context().trace_id
            if current is not None:
                current.hold(trace_id)
            yield span
    finally:
        if current is not None and trace_id is not None:
            current.settle(trace_id, always=True, project=project)


def register(app: Celery) -> None:
    """The pool (execution.pool) runs each body as a coroutine: `await body(rt, delivery, *args)`."""
    for name, body in ((TASK_NAME, run_job), (LINE_TASK_NAME, run_lines), (EMBED_TASK_NAME, run_embed)):
        app.task(name=name)(body)
