"""The tasks: a single job, one line of a batch, one request of an embedding backfill.

Every task runs the same attempt (`attempt_job`): shared rate limiter, one upstream call, then the
retry policy decides: done, retry later (re-published with a countdown, freeing the worker slot),
fail, or pause the batch. A delivery counter bounds lines that kill their worker process.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from openinference.instrumentation import using_attributes
from openinference.semconv.trace import SpanAttributes
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode

from routerq import telemetry
from routerq.batches import Batch, BatchStatus, Outcome, output_line
from routerq.jobs import Job, JobError, JobFailedError, JobKind, JobResult
from routerq.ratelimit import Lease, estimate_tokens
from routerq.spans import (
    ATTEMPT,
    BATCH_ID,
    BATCH_LINE,
    DECISION,
    ERROR_CLASS,
    chain_attributes,
    chain_kind,
    output_attribute,
    worker_attributes,
)
from worker.app import EMBED_TASK_NAME, LINE_TASK_NAME, TASK_NAME
from worker.openrouter import UpstreamAnswer
from worker.retry import Action, Decision, decide, error_class
from worker.runtime import Runtime, runtime

log = logging.getLogger(__name__)
LIMITER_DEFER_S = 5.0  # waits longer than this give the slot back and come back later


class Deferred(Exception):
    """The shared limiter asks for a long wait: re-publish instead of holding the slot."""

    def __init__(self, delay: float) -> None:
        super().__init__(f"rate limited for {delay:.1f} s")
        self.delay = delay


def attempt_job(rt: Runtime, task: Task, job: Job, attempt: int) -> tuple[JobResult, Decision | None]:
    """One upstream attempt with the job's context on every span. Decision is None on success."""
    started = time.time()
    span = trace.get_current_span()
    for key, value in worker_attributes(job, (started - job.enqueued_at) * 1000, attempt).items():
        span.set_attribute(key, value)
    rt.pricing.ensure(job.models)
    model = job.models[0]
    lease = _acquire(rt, model, estimate_tokens(job.body))
    answer: UpstreamAnswer | None = None
    try:
        with using_attributes(**_context_kwargs(job)):
            try:
                answer = rt.openrouter.call(job)
            except SoftTimeLimitExceeded:
                message = f"no answer within ROUTERQ_JOB_TIME_LIMIT ({rt.settings.job_time_limit:g} s)"
                answer = UpstreamAnswer(None, JobError(code="timeout", message=message))
    finally:
        usage = answer.usage if answer is not None else None
        rt.limiter.release(lease, usage.total_tokens if usage else None)
    decision = None
    if answer.error:
        decision = decide(answer.error, answer.retry_after, attempt, rt.settings)
        span.set_status(Status(StatusCode.ERROR, answer.error.message))
        span.set_attribute(ERROR_CLASS, error_class(answer.error))
        span.set_attribute(DECISION, decision.action.value)
        if answer.error.status_code == 429:
            rt.limiter.penalize(model, answer.retry_after or 1.0)
        log.warning(
            "job %s attempt %d: %s (%s) -> %s %s",
            job.id, attempt, answer.error.message, answer.error.code, decision.action.value, decision.reason,
        )  # fmt: skip
    response = answer.response or {}
    result = JobResult(
        job_id=job.id,
        kind=job.kind,
        status="failed" if answer.error else "succeeded",
        response=answer.response,
        error=_final_error(answer.error, decision),
        model=response.get("model") or model,
        provider=response.get("provider"),
        generation_id=response.get("id"),
        usage=answer.usage,
        attempts=attempt,
        enqueued_at=job.enqueued_at,
        started_at=started,
        finished_at=time.time(),
        batch_id=job.batch_id,
        custom_id=job.custom_id,
        trace_id=_trace_id(span),
    )
    return result, decision


def _acquire(rt: Runtime, model: str, tokens: int) -> Lease:
    waited = 0.0
    while True:
        lease, wait = rt.limiter.try_acquire(model, tokens)
        if lease is not None:
            return lease
        if wait > LIMITER_DEFER_S or waited + wait > LIMITER_DEFER_S * 4:
            raise Deferred(wait)
        time.sleep(wait)
        waited += wait


def _final_error(error: JobError | None, decision: Decision | None) -> JobError | None:
    if error is None or decision is None or decision.action is not Action.FAIL or not decision.reason:
        return error
    if decision.reason == "not retryable":
        return error
    return error.model_copy(update={"message": f"{error.message} ({decision.reason})"})


def _delivery_key(task: Task, job_id: str) -> str:
    """One counter per message: a retry is a new message (its `retries` is one higher)."""
    return f"routerq:deliveries:{job_id}:{task.request.id}:{task.request.retries or 0}"


def _over_delivered(rt: Runtime, task: Task, job_id: str) -> int | None:
    """Counts deliveries of this very message; a job that keeps killing its worker stops here."""
    name = _delivery_key(task, job_id)
    pipe = rt.redis.pipeline(transaction=False)
    pipe.incr(name)
    pipe.expire(name, 24 * 3600)
    count = int(pipe.execute()[0])
    return count if count > rt.settings.max_deliveries else None


def _poison(job_id: str, deliveries: int) -> JobError:
    return JobError(
        code="worker_lost",
        message=f"the worker running this job died {deliveries - 1} times (ROUTERQ_MAX_DELIVERIES); "
        "not trying again",
    )


def _retry(task: Task, attempt: int, delay: float, carry: dict[str, Any] | None) -> Exception:
    kwargs = {**(task.request.kwargs or {}), **(carry or {}), "attempt": attempt}
    return task.retry(kwargs=kwargs, countdown=delay)  # type: ignore[no-any-return]


def attempt_or_retry(
    rt: Runtime,
    task: Task,
    job: Job,
    attempt: int,
    before_retry: Callable[[], None] | None = None,
    carry: dict[str, Any] | None = None,
) -> tuple[JobResult, Decision | None]:
    """An attempt whose outcome is final or a pause; a retry (or a long limiter wait) re-publishes
    the task with a countdown, plus the `carry` kwargs, and ends this run after `before_retry`."""
    try:
        result, decision = attempt_job(rt, task, job, attempt)
    except Deferred as deferred:
        if before_retry:
            before_retry()
        raise _retry(task, attempt, deferred.delay, carry) from None
    if decision is not None and decision.action is Action.RETRY:
        if before_retry:
            before_retry()
        raise _retry(task, attempt + 1, decision.delay, carry)
    return result, decision


def run_job(task: Task, payload: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
    job = Job.model_validate(payload)
    rt = runtime(task.app)
    stored = rt.store.get(job.id)
    if stored is not None and stored.ok:
        log.info("job %s already has a stored result; not calling upstream again", job.id)
        return {"job_id": job.id, "status": stored.status}
    deliveries = _over_delivered(rt, task, job.id)
    if deliveries:
        result = _failed_without_call(job, _poison(job.id, deliveries), attempt)
    else:
        result, _ = attempt_or_retry(rt, task, job, attempt)
    rt.store.put(result)
    if not result.ok:
        raise JobFailedError(result)
    return {"job_id": job.id, "status": result.status}


def run_line(
    task: Task,
    batch_id: str,
    index: int,
    enqueued_at: float,
    attempt: int = 1,
    traceparent: str | None = None,
) -> dict[str, Any]:
    """One batch line in its own trace: `routerq.line` (CHAIN) from enqueue to outcome, the LLM call
    under it. A retry carries the trace on, one level deeper, through `traceparent`."""
    parent = propagate.extract({"traceparent": traceparent}) if traceparent else otel_context.Context()
    started = enqueued_at if attempt == 1 else time.time()  # the first span shows the queue wait
    with telemetry.tracer().start_as_current_span(
        "routerq.line",
        context=parent,
        start_time=int(started * 1e9),
        attributes={**chain_kind(), BATCH_ID: batch_id, BATCH_LINE: index, ATTEMPT: attempt},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            summary, result = _run_line(task, span, batch_id, index, enqueued_at, attempt)
        except Retry:
            span.set_attribute(SpanAttributes.OUTPUT_VALUE, "retrying")
            raise
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            raise
        if result is not None:
            text = result.text if result.ok else (result.error.message if result.error else result.status)
            span.set_attribute(SpanAttributes.OUTPUT_VALUE, output_attribute(text))
            if not result.ok:
                span.set_status(Status(StatusCode.ERROR, text))
                raise JobFailedError(result)
        else:
            span.set_attribute(SpanAttributes.OUTPUT_VALUE, summary["status"])
        return summary


def _run_line(
    task: Task, span: trace.Span, batch_id: str, index: int, enqueued_at: float, attempt: int
) -> tuple[dict[str, Any], JobResult | None]:
    """The line's outcome: a summary, and the result when the line was tried (None when skipped)."""
    rt = runtime(task.app)
    store = rt.batches
    start = store.begin(batch_id, index, _delivery_key(task, f"{batch_id}-{index}"))
    batch, line = start.batch, start.line
    summary = {"batch_id": batch_id, "index": index}
    if batch is None or line is None:
        store.unmark_running(batch_id, index)
        log.warning("batch %s line %d has expired or never existed; dropping it", batch_id, index)
        return {**summary, "status": "missing"}, None
    if start.outcome is Outcome.SUCCEEDED:
        store.unmark_running(batch_id, index)
        log.info("batch %s line %d already succeeded; not calling upstream again", batch_id, index)
        return {**summary, "status": "succeeded"}, None
    if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED, BatchStatus.FAILED):
        error = JobError(
            code="batch_cancelled", message=f"batch is {batch.status.value}; line not sent upstream"
        )
        line_out = {"id": None, "custom_id": line["custom_id"], "response": None, "error": error.model_dump()}
        store.record(batch_id, index, Outcome.CANCELLED, line_out, None)
        return {**summary, "status": "cancelled"}, None
    if batch.status is BatchStatus.PAUSED and store.park(batch_id, index):
        return {**summary, "status": "parked"}, None

    job = line_job(batch, index, line, enqueued_at)
    span.set_attributes(chain_attributes(job.prompt_text))
    if start.deliveries > rt.settings.max_deliveries:
        result = _failed_without_call(job, _poison(job.id, start.deliveries), attempt)
        store.record(batch_id, index, Outcome.FAILED, output_line(job.custom_id or "", result), result)
        return {**summary, "status": "failed"}, result
    try:
        result, decision = attempt_or_retry(
            rt,
            task,
            job,
            attempt,
            lambda: store.unmark_running(batch_id, index),
            {"traceparent": _traceparent()},
        )
    except Retry:
        raise
    except Exception as exc:  # a bug or an outage of ours: record it, never drop the line silently
        result = _failed_without_call(job, JobError(code="internal_error", message=repr(exc)), attempt)
        store.record(batch_id, index, Outcome.FAILED, output_line(job.custom_id or "", result), result)
        raise
    if decision is not None and decision.action is Action.PAUSE:
        store.pause(batch_id, decision.reason)
        if store.park(batch_id, index):
            return {**summary, "status": "parked"}, None
    outcome = Outcome.SUCCEEDED if result.ok else Outcome.FAILED
    store.record(batch_id, index, outcome, output_line(job.custom_id or "", result), result)
    return {**summary, "status": result.status}, result


def _traceparent() -> str | None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


def run_embed(
    task: Task, run_id: str, indexes: list[int], enqueued_at: float, attempt: int = 1
) -> dict[str, Any]:
    """One embeddings request for many texts; vectors are stored as raw float32, never as JSON text."""
    rt = runtime(task.app)
    run = rt.embeddings.get(run_id)
    if run is None:
        log.warning("embedding run %s has expired; dropping its request", run_id)
        return {"run": run_id, "stored": 0}
    todo = rt.embeddings.missing_of(run_id, indexes)
    if not todo:
        return {"run": run_id, "stored": 0}
    body: dict[str, Any] = {
        "model": run.model,
        "input": rt.embeddings.texts(run_id, todo),
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
    deliveries = _over_delivered(rt, task, job.id)
    if deliveries:
        rt.embeddings.record_failure(run_id, len(todo))
        raise JobFailedError(_failed_without_call(job, _poison(job.id, deliveries), attempt))
    result, _ = attempt_or_retry(rt, task, job, attempt)
    if not result.ok or result.response is None:
        rt.embeddings.record_failure(run_id, len(todo))
        raise JobFailedError(result)
    vectors = {todo[item["index"]]: base64.b64decode(item["embedding"]) for item in result.response["data"]}
    usage = result.usage
    tokens, cost = (usage.prompt_tokens, usage.cost or 0.0) if usage else (0, 0.0)
    return {"run": run_id, "stored": rt.embeddings.store_vectors(run_id, vectors, tokens, cost)}


def _failed_without_call(job: Job, error: JobError, attempt: int) -> JobResult:
    now = time.time()
    return JobResult(
        job_id=job.id,
        kind=job.kind,
        status="failed",
        error=error,
        attempts=attempt,
        enqueued_at=job.enqueued_at,
        started_at=now,
        finished_at=now,
        batch_id=job.batch_id,
        custom_id=job.custom_id,
    )


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


def _trace_id(span: trace.Span) -> str | None:
    context = span.get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


def _context_kwargs(job: Job) -> dict[str, Any]:
    """Only what the job has: OpenInference would otherwise record empty sessions and users."""
    kwargs: dict[str, Any] = {"session_id": job.session_id, "user_id": job.user_id}
    kwargs = {k: v for k, v in kwargs.items() if v}
    if job.metadata:
        kwargs["metadata"] = dict(job.metadata)
    if job.tags:
        kwargs["tags"] = list(job.tags)
    return kwargs


def register(app: Celery) -> None:
    """Attempts are bounded by ROUTERQ_MAX_ATTEMPTS (retry policy), not by Celery's max_retries."""
    options = {"bind": True, "max_retries": None}
    app.task(name=TASK_NAME, **options)(run_job)
    app.task(name=LINE_TASK_NAME, **options)(run_line)
    app.task(name=EMBED_TASK_NAME, **options)(run_embed)
