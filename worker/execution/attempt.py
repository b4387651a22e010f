"""One upstream attempt, and what the retry policy makes of it.

Every task runs the same attempt: a call slot, the shared rate limiter, one upstream call bounded by
ROUTERQ_JOB_TIME_LIMIT, then the retry policy decides: done, retry later (the task is re-published
with a countdown, so the message is acknowledged and the slot freed), fail, or pause the batch.

A slot is held for the limiter and the call only, not while the line's state is read or its outcome
stored: `--concurrency` counts calls upstream, and a slot idle during Redis round trips on a busy
event loop cost ~15 % of the calls in flight (measured at C=64).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from openinference.instrumentation import using_attributes
from opentelemetry import trace

from routerq.core.jobs import Job, JobError, JobResult
from routerq.core.spans import DECISION, ERROR_CLASS, worker_attributes
from routerq.worker.execution.pool import DRAINING, Delivery
from routerq.worker.execution.republish import republish
from routerq.worker.execution.runtime import Runtime
from routerq.worker.signals import Deferred, NotStarted, Republished
from routerq.worker.upstream.call_record import Recording, untraced
from routerq.worker.upstream.cost_estimate import estimate_tokens
from routerq.worker.upstream.limiter import Lease
from routerq.worker.upstream.openrouter import UpstreamAnswer
from routerq.worker.upstream.retry import (
    Action,
    Decision,
    Tries,
    decide,
    error_class,
    refusal,
    wait_for_capacity,
)

log = logging.getLogger(__name__)
# A limiter wait longer than this gives the slot back and comes back later (re-published with a
# countdown); shorter waits are slept in place, cheaper than a round trip through the queue.
LIMITER_DEFER_S = 5.0
# A line whose call does not fit its batch's budget yet (calls in flight hold reservations) comes back
# after this long: about what a call takes, so the reservations ahead of it have settled.
BUDGET_WAIT_S = 1.0


class Retrying(Republished):
    """The attempt was re-published with a countdown; this run of the task ends here."""

    def __init__(self, attempt: Attempt) -> None:
        super().__init__("re-published for a retry")
        self.attempt = attempt


class Guard(Protocol):
    """What a task's calls must respect beyond the slot and the limiter (a batch's state), asked with
    the call slot held, so no other call slips in between the check and the call, or between an
    answer that pauses and the pause."""

    async def before_call(self) -> None:
        """Returns when the call may start; raises Deferred (come back later) or Halted."""

    async def pause(self, reason: str) -> None:
        """An answer says stop all calls (a revoked key, no credits)."""


SHUTDOWN_REQUEUE = "worker_shutdown"


@dataclass(frozen=True)
class Attempt:
    """One attempt's outcome. Decision is None on success."""

    result: JobResult
    decision: Decision | None
    limited: bool = False  # it waited for the shared limiter before its call
    recording: Recording | None = None  # the call was made untraced (worker.call_record)


async def attempt_job(
    rt: Runtime, job: Job, tries: Tries, guard: Guard | None = None, record: bool = False
) -> Attempt:
    """One upstream attempt with the job's context (session, user, metadata) on the LLM span; with
    `record`, the call makes no span and is recorded instead, to be traced later if needed."""
    attempt = tries.attempt
    recording = Recording() if record else None
    await rt.ensure_priced(job.models)
    model = job.models[0]
    decision = None
    async with rt.slots:
        if DRAINING.is_set():
            raise NotStarted("worker shutting down")
        if guard is not None:
            await guard.before_call()
        started = time.time()
        answer, limited = await _call(rt, job, model, recording)
        if answer.error:
            decision = decide(answer.error, answer.retry_after, tries, rt.settings, time.time())
            if decision.action is Action.PAUSE and guard is not None:
                await guard.pause(decision.reason)
    if answer.error and decision is not None:
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
        error=final_error(answer.error, decision),
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
        trace_id=_trace_id(trace.get_current_span()),
    )
    return Attempt(result, decision, limited, recording)


async def _call(
    rt: Runtime, job: Job, model: str, recording: Recording | None
) -> tuple[UpstreamAnswer, bool]:
    """The upstream call under a limiter lease; whether it had to wait for the lease."""
    lease, limited = await _acquire(rt, model, estimate_tokens(job.body))
    answer: UpstreamAnswer | None = None
    try:
        # an untraced call makes no span: the job's context is given to its replay, if any
        with untraced(recording) if recording else using_attributes(**_context_kwargs(job)):
            try:
                async with asyncio.timeout(rt.settings.job_time_limit):
                    if recording is not None:
                        recording.started = time.time()
                    answer = await rt.openrouter.call(job)
            except TimeoutError:
                message = f"no answer within ROUTERQ_JOB_TIME_LIMIT ({rt.settings.job_time_limit:g} s)"
                answer = UpstreamAnswer(None, JobError(code="timeout", message=message))
            finally:
                if recording is not None:
                    recording.finished = time.time()
    finally:
        usage = answer.usage if answer is not None else None
        error = answer.error if answer is not None else None
        answered = answer is not None and (
            error is None or (error.status_code is not None and not refusal(error))
        )
        await rt.limiter.release(lease, usage.total_tokens if usage else None, answered)
    source = refusal(answer.error) if answer.error else None
    if source is not None:
        try:
            rate = await rt.limiter.penalize(model, lease, answer.retry_after, source)
            log.debug("%s: refused upstream (%s); every worker paces it at %.1f calls/s", model, source, rate)
        except redis.RedisError as exc:  # advice to the limiter: never the line's outcome
            log.warning("%s: could not slow the model down after a refusal: %s", model, exc)
    return answer, limited


async def replay_call(rt: Runtime, job: Job) -> None:
    """The job's call again, with its context, for a replay (worker.call_record.replaying)."""
    with using_attributes(**_context_kwargs(job)):
        await rt.openrouter.call(job)


def attempt_attributes(job: Job, tries: Tries, attempt: Attempt) -> dict[str, Any]:
    """What a span says about the job and its last attempt; the queue wait is up to the first try."""
    first_try = tries.since or attempt.result.started_at or time.time()
    attributes = worker_attributes(job, (first_try - job.enqueued_at) * 1000, tries.attempt)
    error, decision = attempt.result.error, attempt.decision
    if error is not None:
        attributes[ERROR_CLASS] = error_class(error)
    if decision is not None:
        attributes[DECISION] = decision.action.value
    return attributes


async def _acquire(rt: Runtime, model: str, tokens: int) -> tuple[Lease, bool]:
    """A lease, and whether it had to wait for it. A line that finds more than IN_PLACE_S of its model's
    pace already waiting in this process goes back with a countdown to about its turn instead of
    taking one more of the worker's held lines (upstream.pace_waiters)."""
    lease, wait = await rt.limiter.try_acquire(model, tokens)
    if lease is not None:
        return lease, False
    turn = await rt.pace.turn(model)
    if turn > 0:
        raise Deferred(max(wait, turn), f"{model}'s pace, lines ahead of it")
    waited = 0.0
    with rt.pace.waiting(model):
        while True:
            if wait > LIMITER_DEFER_S or waited + wait > LIMITER_DEFER_S * 4:
                raise Deferred(wait)
            await asyncio.sleep(wait)
            waited += wait
            lease, wait = await rt.limiter.try_acquire(model, tokens)
            if lease is not None:
                return lease, True


def final_error(error: JobError | None, decision: Decision | None) -> JobError | None:
    """The error a failed job keeps: upstream's, plus why the policy gave up when it did."""
    if error is None or decision is None or decision.action is not Action.FAIL or not decision.reason:
        return error
    return error.model_copy(update={"message": f"{error.message} ({decision.reason})"})


async def attempt_or_retry(
    rt: Runtime,
    delivery: Delivery,
    *,
    job: Job,
    tries: Tries,
    args: list[Any],
    before_retry: Callable[[float, str], Awaitable[None]] | None = None,
    carry: dict[str, Any] | None = None,
    guard: Guard | None = None,
    record: bool = False,
) -> Attempt:
    """An attempt whose outcome is final or a pause. A retry (or a long limiter wait, or a `guard`
    that defers) re-publishes the task, with `args`, the next tries and `carry`, after
    `before_retry(delay, why)`; then raises Retrying. An attempt a warm shutdown stopped before its call goes
    back to the queue at once, as it came. Halted (from the guard) goes to the caller."""
    unstarted = tries
    tries = tries.started(time.time())
    try:
        attempt = await attempt_job(rt, job, tries, guard, record)
        decision = attempt.decision
    except NotStarted as exc:
        await _republish(rt, delivery, args, unstarted, 0.0, carry, before_retry, str(exc))
        error = JobError(code=SHUTDOWN_REQUEUE, message=f"{exc}: back on the queue before its call")
        raise Retrying(Attempt(failed_without_call(job, error, tries.attempt), None)) from None
    except Deferred as deferred:
        decision = wait_for_capacity(deferred.delay, tries, rt.settings, time.time())
        reason = decision.reason or f"waiting {deferred.delay:.1f} s"
        error = JobError(code="rate_limit_exceeded", message=f"{deferred.what}: {reason}")
        attempt = Attempt(failed_without_call(job, error, tries.attempt), decision, limited=True)
    if decision is not None and decision.action is Action.RETRY:
        why = attempt.result.error.message if attempt.result.error else "retry"
        await _republish(rt, delivery, args, tries.after(decision), decision.delay, carry, before_retry, why)
        raise Retrying(attempt)
    return attempt


async def _republish(
    rt: Runtime,
    delivery: Delivery,
    args: list[Any],
    tries: Tries,
    delay: float,
    carry: dict[str, Any] | None,
    before_retry: Callable[[float, str], Awaitable[None]] | None,
    why: str,
) -> None:
    """`before_retry` learns when the work comes back and why, before it is re-published (and may
    add to `carry`)."""
    if before_retry is not None:
        await before_retry(delay, why)
    await republish(rt, delivery, args, {**(carry or {}), "tries": tries.dump()}, delay)


def failed_without_call(job: Job, error: JobError, attempt: int) -> JobResult:
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


def _trace_id(span: trace.Span) -> str | None:
    """The trace to look the job up in; None when this worker does not trace (even if its producer did)."""
    context = span.get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid and span.is_recording() else None


def _context_kwargs(job: Job) -> dict[str, Any]:
    """Only what the job has: OpenInference would otherwise record empty sessions and users."""
    kwargs: dict[str, Any] = {"session_id": job.session_id, "user_id": job.user_id}
    kwargs = {k: v for k, v in kwargs.items() if v}
    if job.metadata:
        kwargs["metadata"] = dict(job.metadata)
    if job.tags:
        kwargs["tags"] = list(job.tags)
    return kwargs
