"""A batch's lines as OpenRouter batches (`submit --via batch`): submit one upstream batch, poll it
until it ends, and record each result as a live line's outcome would be recorded.

One message carries one upstream batch (a chunk of lines of one endpoint and one model). Its state
lives in Redis (routerq.core.upstream_batch), so any worker can take over after a death: a message
put back on the queue finds OpenRouter's batch id and polls instead of submitting again. Polls are
the message itself, re-published with a countdown (POLL_FIRST_S, doubling up to POLL_MAX_S): a
waiting batch holds no call slot and costs Redis one message every poll.

The one window where a chunk is ambiguous: a worker killed after OpenRouter's 202 and before the id
is stored (the chunk says "submitting" with no id). OpenRouter has no idempotency key, so routerq
cannot ask whether it got it; it submits again and logs a warning. The lines are recorded once (a
success is final), but OpenRouter may run and bill that chunk twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx
from celery import Celery
from openinference.semconv.trace import OpenInferenceSpanKindValues, SpanAttributes
from opentelemetry.trace import Status, StatusCode

from routerq.core import telemetry
from routerq.core.batch_format import error_line, output_line
from routerq.core.batch_store import Batch, BatchStatus, Fallback, Go, Outcome
from routerq.core.broker import LINE_TASK_NAME, LINES_PER_MESSAGE, UPSTREAM_BATCH_TASK_NAME
from routerq.core.errors import UpstreamBatchError
from routerq.core.jobs import Job, JobError, JobKind, JobResult, Usage
from routerq.core.redaction import redact
from routerq.core.spans import BATCH_ID, BATCH_LINE, annotate_llm_span, chain_attributes, context_attributes
from routerq.core.staged_enqueue import batched
from routerq.core.upstream_batch import BATCH_ENDPOINTS, ChunkOwner, ChunkStatus, batch_owner, new_chunk_id
from routerq.worker.execution.pool import Delivery
from routerq.worker.execution.republish import republish
from routerq.worker.execution.runtime import Runtime
from routerq.worker.execution.tasks import line_job, summary_if_ended
from routerq.worker.tracing.line_trace import LineTrace
from routerq.worker.tracing.tail_sampler import sampler
from routerq.worker.tracing.upstream_batch_span import mapping, upstream_batch_span
from routerq.worker.upstream.batch_api import POLL_FIRST_S, TERMINAL, next_poll_s, parse_result
from routerq.worker.upstream.cost_estimate import batch_line_cost
from routerq.worker.upstream.retry import RETRYABLE_STATUS, Action, Tries, decide

log = logging.getLogger(__name__)

# A chunk whose budget is held by upstream batches still running looks again this often: they take
# minutes, and each look is one message and one Lua call.
BUDGET_CHUNK_WAIT_S = 10.0
_STOPPED = (BatchStatus.CANCELLING, BatchStatus.CANCELLED, BatchStatus.FAILED)


async def run_upstream_batch(
    rt: Runtime,
    delivery: Delivery,
    batch_id: str,
    chunk_id: str,
    indexes: list[int],
    enqueued_at: float,
    tries: dict[str, float] | None = None,
    attempt: int = 1,
) -> dict[str, Any]:
    """One step of one upstream batch: submit it, or look at it once (and come back later)."""
    starts = await rt.batches.begin(batch_id, indexes, mark=False)
    batch = starts[0].batch if starts else None
    if batch is None:
        log.warning("batch %s has expired; dropping its upstream batch %s", batch_id, chunk_id)
        return {"batch_id": batch_id, "chunk": chunk_id, "status": "missing"}
    todo = {
        i: s.line for i, s in zip(indexes, starts, strict=True) if s.outcome is None and s.line is not None
    }
    state = await rt.chunks.get(batch_owner(batch_id), chunk_id)
    for index in json.loads(state.get("held_back") or "[]"):  # they go in the next upstream batch
        todo.pop(index, None)
    upstream_id = state.get("upstream_id")
    args = [batch_id, chunk_id, indexes, enqueued_at]
    if not upstream_id:
        if batch.status in _STOPPED or not todo:
            await _cancel_lines(rt, batch, todo, enqueued_at)
            await rt.chunks.set(batch_owner(batch_id), chunk_id, ChunkStatus.DONE)
            return {"batch_id": batch_id, "chunk": chunk_id, "status": "not submitted"}
        return await _submit(rt, delivery, batch, chunk_id, todo, args, Tries.load(tries), attempt, state)
    return await _poll(rt, delivery, batch, chunk_id, upstream_id, todo, args, state, enqueued_at, attempt)


async def _submit(
    rt: Runtime,
    delivery: Delivery,
    batch: Batch,
    chunk_id: str,
    todo: dict[int, dict[str, Any]],
    args: list[Any],
    tries: Tries,
    attempt: int,
    state: dict[str, str],
) -> dict[str, Any]:
    first = next(iter(todo.values()))
    endpoint, model = BATCH_ENDPOINTS[JobKind(first["kind"])], str(first["body"].get("model"))
    if batch.max_cost is not None:
        budgeted = await _within_budget(rt, delivery, batch, chunk_id, model, todo, args, attempt, state)
        if isinstance(budgeted, str):
            return {"batch_id": batch.id, "chunk": chunk_id, "status": budgeted}
        todo = budgeted
    if state.get("status") == ChunkStatus.SUBMITTING:
        log.warning(
            "batch %s: upstream batch %s was being submitted when its worker stopped; OpenRouter may have "
            "it already (it has no idempotency key): submitting again", batch.id, chunk_id,
        )  # fmt: skip
    requests = [{"custom_id": str(index), "body": line["body"]} for index, line in todo.items()]
    await rt.chunks.set(batch_owner(batch.id), chunk_id, ChunkStatus.SUBMITTING, submitting_at=time.time())
    try:
        created = await rt.batch_api.submit(endpoint, model, requests)
    except UpstreamBatchError as exc:
        error = JobError(code="upstream_batch_refused", message=exc.message, status_code=exc.status_code)
        decision = decide(error, exc.retry_after, tries, rt.settings, time.time())
        if decision.action is Action.RETRY:
            await rt.chunks.set(batch_owner(batch.id), chunk_id, ChunkStatus.NEW)
            kwargs = {"tries": tries.after(decision).dump(), "attempt": attempt}
            await republish(rt, delivery, args, kwargs, decision.delay)
            return {"batch_id": batch.id, "chunk": chunk_id, "status": "retrying submit"}
        if batch.fallback is Fallback.LIVE:
            log.warning("batch %s: OpenRouter refused an upstream batch (%s); lines go live", batch.id, exc)
            _go_live(rt, batch, list(todo), float(args[3]))
        else:
            await _fail_lines(rt, batch, todo, error, float(args[3]), attempt)
        await rt.chunks.set(batch_owner(batch.id), chunk_id, ChunkStatus.DONE, upstream_status="refused")
        await rt.chunks.unreserve(batch.id, chunk_id)
        return {"batch_id": batch.id, "chunk": chunk_id, "status": "refused"}
    upstream_id = str(created["id"])
    owner = batch_owner(batch.id)
    await rt.chunks.set(
        owner, chunk_id, ChunkStatus.SUBMITTED, upstream_id=upstream_id, submitted_at=time.time(),
        endpoint=endpoint, model=model, upstream_status=str(created.get("status") or "validating"),
    )  # fmt: skip
    log.info("batch %s: %d line(s) sent as OpenRouter batch %s", batch.id, len(requests), upstream_id)
    await republish(rt, delivery, args, {"attempt": attempt}, POLL_FIRST_S)
    return {"batch_id": batch.id, "chunk": chunk_id, "status": "submitted", "upstream_id": upstream_id}


async def _within_budget(
    rt: Runtime,
    delivery: Delivery,
    batch: Batch,
    chunk_id: str,
    model: str,
    todo: dict[int, dict[str, Any]],
    args: list[Any],
    attempt: int,
    state: dict[str, str],
) -> dict[int, dict[str, Any]] | str:
    """The lines of this chunk its batch's `--max-cost` lets it submit now, their estimate reserved
    at the batch price (batch_reserve.lua); the others are held back and go as the next upstream
    batch once this one has ended. A string says why none go now."""
    estimate = await _line_estimate(rt, batch, model, todo)
    fit = await rt.chunks.reserve(batch.id, chunk_id, estimate, len(todo))
    if fit in (Go.STOPPED, Go.MISSING):
        await _cancel_lines(rt, batch, todo, float(args[3]))
        await rt.chunks.set(batch_owner(batch.id), chunk_id, ChunkStatus.DONE)
        return "not submitted"
    if fit == Go.PARKED:
        running_again = [index for index in todo if not await rt.batches.park(batch.id, index)]
        if running_again:
            _send_chunk(rt, batch, running_again, float(args[3]), attempt)
        await rt.chunks.set(batch_owner(batch.id), chunk_id, ChunkStatus.DONE, upstream_status="parked")
        return "parked"
    if fit == Go.OVER_BUDGET:
        await republish(rt, delivery, args, {"attempt": attempt}, BUDGET_CHUNK_WAIT_S)
        return "waiting for budget"
    indexes = list(todo)
    if fit < len(indexes) and "held_back" not in state:
        held_back = indexes[fit:]
        await rt.chunks.set(batch_owner(batch.id), chunk_id, ChunkStatus.NEW, held_back=json.dumps(held_back))
        log.info(
            "batch %s: its budget lets %d of %d line(s) go now (about $%.6f each at the batch price)",
            batch.id, fit, len(indexes), estimate or 0.0,
        )  # fmt: skip
    return {index: todo[index] for index in indexes[:fit]}


async def _line_estimate(
    rt: Runtime, batch: Batch, model: str, todo: dict[int, dict[str, Any]]
) -> float | None:
    """A line's likely cost at the batch price: from OpenRouter's per-token prices (and the batch's
    answers so far for their length), else the batch's cost per success; None when neither is known."""
    try:
        price = await asyncio.to_thread(rt.prices.get, model)
    except httpx.HTTPError as exc:
        log.warning(
            "batch %s: cannot read OpenRouter's prices (%s)", batch.id, redact(str(exc), rt.settings.secrets)
        )
        price = None
    answered = batch.succeeded or None
    if price is not None:
        mean_completion = batch.completion_tokens / answered if answered else None
        return batch_line_cost((line["body"] for line in todo.values()), price, mean_completion)
    return batch.cost / answered if answered else None


async def _poll(
    rt: Runtime,
    delivery: Delivery,
    batch: Batch,
    chunk_id: str,
    upstream_id: str,
    todo: dict[int, dict[str, Any]],
    args: list[Any],
    state: dict[str, str],
    enqueued_at: float,
    attempt: int,
) -> dict[str, Any]:
    cancelled = batch.status in _STOPPED
    if cancelled and todo:  # the routerq batch ends now; what OpenRouter still bills is counted later
        await _cancel_lines(rt, batch, todo, enqueued_at)
        todo = {}
    found, status, polls = await look_at(rt, batch_owner(batch.id), chunk_id, upstream_id, state)
    if status not in TERMINAL:
        await republish(rt, delivery, args, {"attempt": attempt}, next_poll_s(polls))
        return {"batch_id": batch.id, "chunk": chunk_id, "status": status}
    submitted_at = float(state.get("submitted_at") or time.time())
    usage = mapping(found.get("usage"))
    if cancelled or not todo:
        if usage.get("cost"):
            await rt.batches.add_cost(batch.id, float(usage["cost"]))
        again: list[int] = []
    elif status == "completed":
        again = await _record_results(rt, batch, upstream_id, todo, found, submitted_at, enqueued_at, attempt)
    else:
        again = list(todo)  # failed, expired, cancelled upstream: every line goes again
        log.warning(
            "batch %s: OpenRouter batch %s ended %s; its %d line(s) go again",
            batch.id,
            upstream_id,
            status,
            len(again),
        )
    if again:
        await _again(rt, batch, again, enqueued_at, attempt)
    held_back = json.loads(state.get("held_back") or "[]")
    if held_back and not cancelled:
        _send_chunk(rt, batch, held_back, enqueued_at, attempt)
    await rt.chunks.set(
        batch_owner(batch.id), chunk_id, ChunkStatus.DONE, upstream_status=status, done_at=time.time()
    )
    await rt.chunks.unreserve(batch.id, chunk_id)
    session = batch.session_id or batch.id
    with upstream_batch_span(found, upstream_id, submitted_at, session, batch.project, {BATCH_ID: batch.id}):
        pass
    return {"batch_id": batch.id, "chunk": chunk_id, "status": status, "again": len(again)}


async def look_at(
    rt: Runtime, owner: ChunkOwner, chunk_id: str, upstream_id: str, state: dict[str, str]
) -> tuple[dict[str, Any], str, int]:
    """The upstream batch as OpenRouter says it is now (as last known when it cannot be asked), its
    status, and the polls so far, this one counted."""
    try:
        found = await rt.batch_api.get(upstream_id)
    except UpstreamBatchError as exc:
        log.warning("%s: looking at OpenRouter batch %s failed: %s", owner, upstream_id, exc)
        found = {"status": state.get("upstream_status") or "in_progress"}
    status = str(found.get("status"))
    return found, status, await rt.chunks.polled(owner, chunk_id, status)


async def _record_results(
    rt: Runtime,
    batch: Batch,
    upstream_id: str,
    todo: dict[int, dict[str, Any]],
    found: dict[str, Any],
    submitted_at: float,
    enqueued_at: float,
    attempt: int,
) -> list[int]:
    """Each result becomes its line's outcome; the indexes of retryable failures (and of lines
    without a result) are returned, to go again."""
    results = {str(r.get("custom_id")): r for r in found.get("results") or [] if isinstance(r, dict)}
    finished = float(found.get("finalized_at") or time.time())
    again: list[int] = []
    jobs = {index: line_job(batch, index, line, enqueued_at) for index, line in todo.items()}
    outcomes = {
        index: _result(job, results.get(str(index)), submitted_at, finished, attempt)
        for index, job in jobs.items()
    }
    apportioned = _apportion_cost(outcomes, mapping(found.get("usage")).get("cost"))
    for index, job in jobs.items():
        item, result = results.get(str(index)), outcomes[index]
        retryable = result.error is not None and (
            item is None or (result.error.status_code or 0) in RETRYABLE_STATUS
        )
        if retryable and (attempt < rt.settings.max_attempts or batch.fallback is Fallback.LIVE):
            again.append(index)
            continue
        traced = _trace_line(batch, index, job, result, upstream_id, index in apportioned)
        outcome = Outcome.SUCCEEDED if result.ok else Outcome.FAILED
        await _record(
            rt, batch.id, index, outcome, output_line(job.custom_id or "", result), result,
            traced=traced, retries=attempt - 1,
        )  # fmt: skip
    return again


def _result(
    job: Job, item: dict[str, Any] | None, started: float, finished: float, attempt: int
) -> JobResult:
    common: dict[str, Any] = {
        "job_id": job.id, "kind": job.kind, "attempts": attempt, "enqueued_at": job.enqueued_at,
        "started_at": started, "finished_at": finished, "batch_id": job.batch_id, "custom_id": job.custom_id,
        "model": job.models[0],
    }  # fmt: skip
    parsed = parse_result(item)
    if isinstance(parsed, JobError):
        return JobResult(**common, status="failed", error=parsed)
    usage = parsed.get("usage") if isinstance(parsed.get("usage"), dict) else None
    return JobResult(
        **common, status="succeeded", response=parsed, provider=parsed.get("provider"),
        generation_id=parsed.get("id"), usage=Usage.model_validate(usage) if usage else None,
    )  # fmt: skip


def _apportion_cost(outcomes: dict[int, JobResult], batch_cost: Any) -> set[int]:
    """Answers whose result says no `usage.cost` get a share of the upstream batch's `usage.cost` (what
    the answers that say theirs leave of it), by tokens; returns their indexes."""
    if not isinstance(batch_cost, int | float):
        return set()
    answered = {i: r.usage for i, r in outcomes.items() if r.ok and r.usage is not None}
    missing = {i: u for i, u in answered.items() if u.cost is None}
    if not missing:
        return set()
    rest = max(0.0, float(batch_cost) - sum(u.cost or 0.0 for u in answered.values()))
    tokens = sum(max(1, u.total_tokens) for u in missing.values())
    for usage in missing.values():
        usage.cost = rest * max(1, usage.total_tokens) / tokens
    return set(missing)


def _trace_line(
    batch: Batch, index: int, job: Job, result: JobResult, upstream_id: str, apportioned: bool = False
) -> bool | None:
    """The line's trace: its root and an LLM span dated from the upstream batch's timeline (its cost
    marked when it is a share of the upstream batch's). None when this worker does not trace."""
    current = sampler()
    if current is None:
        return None
    with LineTrace(current, None, job.enqueued_at) as line_trace:
        line_trace.attributes.update(
            {**chain_attributes(job.prompt_text), **context_attributes(job), BATCH_ID: batch.id,
             BATCH_LINE: index, "routerq.via": "batch", "openrouter.batch_id": upstream_id}
        )  # fmt: skip
        kind = (
            OpenInferenceSpanKindValues.EMBEDDING
            if job.kind is JobKind.EMBEDDING
            else OpenInferenceSpanKindValues.LLM
        )
        usage = result.usage
        attributes: dict[str, Any] = {
            SpanAttributes.OPENINFERENCE_SPAN_KIND: kind.value,
            SpanAttributes.LLM_MODEL_NAME: job.models[0],
            SpanAttributes.INPUT_VALUE: json.dumps(job.body),
            SpanAttributes.INPUT_MIME_TYPE: "application/json",
            **context_attributes(job),
        }
        if result.ok:
            attributes[SpanAttributes.OUTPUT_VALUE] = result.text
        if apportioned and usage is not None and usage.cost is not None:
            attributes["routerq.cost_apportioned"] = True  # a share of the upstream batch's usage.cost
            attributes[SpanAttributes.LLM_COST_TOTAL] = usage.cost
        if usage is not None:
            attributes[SpanAttributes.LLM_TOKEN_COUNT_PROMPT] = usage.prompt_tokens
            attributes[SpanAttributes.LLM_TOKEN_COUNT_COMPLETION] = usage.completion_tokens
            attributes[SpanAttributes.LLM_TOKEN_COUNT_TOTAL] = usage.total_tokens
        span = telemetry.tracer().start_span(
            "ChatCompletion" if job.kind is JobKind.CHAT else "CreateEmbeddingResponse",
            start_time=int(result.started_at * 1e9), attributes=attributes,
        )  # fmt: skip
        body = (
            result.response if result.ok else {"error": (result.error.model_dump() if result.error else {})}
        )
        annotate_llm_span(
            span, 200 if result.ok else (result.error.status_code or 500) if result.error else 500, body
        )
        span.set_status(
            Status(StatusCode.OK)
            if result.ok
            else Status(StatusCode.ERROR, result.error.message if result.error else "")
        )
        span.end(end_time=int(result.finished_at * 1e9))
        text = result.text if result.ok else (result.error.message if result.error else "failed")
        kept = line_trace.decide(not result.ok)
        return line_trace.finish(
            output=text, error=None if result.ok else text, ok=result.ok, kept=kept, project=batch.project
        )


async def _again(rt: Runtime, batch: Batch, indexes: list[int], enqueued_at: float, attempt: int) -> None:
    """Lines that go again: live (`--fallback live`), as a new upstream batch, or they fail once
    routerq's attempts are spent."""
    if batch.fallback is Fallback.LIVE:
        _go_live(rt, batch, indexes, enqueued_at)
        return
    if attempt >= rt.settings.max_attempts:
        error = JobError(code="upstream_batch_failed", message=f"gave up after {attempt} upstream batches")
        lines = await rt.batches.begin(batch.id, indexes, mark=False)
        todo = {
            i: s.line for i, s in zip(indexes, lines, strict=True) if s.line is not None and s.outcome is None
        }
        await _fail_lines(rt, batch, todo, error, enqueued_at, attempt)
        return
    _send_chunk(rt, batch, indexes, enqueued_at, attempt + 1)


def _send_chunk(rt: Runtime, batch: Batch, indexes: list[int], enqueued_at: float, attempt: int) -> None:
    rt.app.send_task(
        UPSTREAM_BATCH_TASK_NAME, args=[batch.id, new_chunk_id(), indexes, enqueued_at],
        kwargs={"attempt": attempt}, queue=rt.settings.queue, ignore_result=True,
    )  # fmt: skip


def _go_live(rt: Runtime, batch: Batch, indexes: list[int], enqueued_at: float) -> None:
    """Lines sent as live calls, as a live batch's lines travel (each line with its own tries)."""
    for chunk in batched(indexes, LINES_PER_MESSAGE):
        rt.app.send_task(
            LINE_TASK_NAME, args=[batch.id, chunk, enqueued_at], queue=rt.settings.queue, ignore_result=True
        )


async def _fail_lines(
    rt: Runtime,
    batch: Batch,
    todo: dict[int, dict[str, Any]],
    error: JobError,
    enqueued_at: float,
    attempt: int,
) -> None:
    now = time.time()
    for index, line in todo.items():
        job = line_job(batch, index, line, enqueued_at)
        result = JobResult(
            job_id=job.id, kind=job.kind, status="failed", error=error, attempts=attempt,
            enqueued_at=enqueued_at, started_at=now, finished_at=now, batch_id=batch.id,
            custom_id=job.custom_id, model=job.models[0],
        )  # fmt: skip
        traced = _trace_line(batch, index, job, result, "")
        await _record(
            rt,
            batch.id,
            index,
            Outcome.FAILED,
            output_line(job.custom_id or "", result),
            result,
            traced=traced,
        )


async def _cancel_lines(
    rt: Runtime, batch: Batch, todo: dict[int, dict[str, Any]], enqueued_at: float
) -> None:
    message = f"batch is {batch.status.value}; line not sent upstream"
    for index, line in todo.items():
        job = line_job(batch, index, line, enqueued_at)
        await _record(
            rt,
            batch.id,
            index,
            Outcome.CANCELLED,
            error_line(job.custom_id or "", "batch_cancelled", message),
            None,
        )


async def _record(
    rt: Runtime,
    batch_id: str,
    index: int,
    outcome: Outcome,
    line: dict[str, Any],
    result: JobResult | None,
    **fields: Any,
) -> None:
    """A line's outcome, through the same store path as a live line's, and the batch's summary trace
    when it was the last."""
    recorded = await rt.batches.record(batch_id, index, outcome, line, result, **fields)
    await summary_if_ended(rt, batch_id, recorded)


def register(app: Celery) -> None:
    app.task(name=UPSTREAM_BATCH_TASK_NAME)(run_upstream_batch)
