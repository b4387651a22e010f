"""The job task: what a worker does with one queued job."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery, Task
from openinference.instrumentation import using_attributes
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from routerq.jobs import Job, JobFailedError, JobResult
from routerq.spans import worker_attributes
from worker.app import TASK_NAME
from worker.runtime import runtime

log = logging.getLogger(__name__)


def run_job(task: Task, payload: dict[str, Any]) -> dict[str, Any]:
    job = Job.model_validate(payload)
    started = time.time()
    rt = runtime(task.app)
    span = trace.get_current_span()
    attempt = (task.request.retries or 0) + 1
    for key, value in worker_attributes(job, (started - job.enqueued_at) * 1000, attempt).items():
        span.set_attribute(key, value)

    stored = rt.store.get(job.id)
    if stored is not None and stored.ok:
        log.info("job %s already has a stored result; not calling upstream again", job.id)
        return {"job_id": job.id, "status": stored.status}

    rt.pricing.ensure(job.models)
    with using_attributes(**_context_kwargs(job)):
        answer = rt.openrouter.call(job)
    usage = answer.usage
    response = answer.response or {}
    result = JobResult(
        job_id=job.id,
        kind=job.kind,
        status="failed" if answer.error else "succeeded",
        response=answer.response,
        error=answer.error,
        model=response.get("model") or job.models[0],
        provider=response.get("provider"),
        generation_id=response.get("id"),
        usage=usage,
        attempts=attempt,
        enqueued_at=job.enqueued_at,
        started_at=started,
        finished_at=time.time(),
        batch_id=job.batch_id,
        custom_id=job.custom_id,
        trace_id=_trace_id(span),
    )
    rt.store.put(result)
    if answer.error:
        span.set_status(Status(StatusCode.ERROR, answer.error.message))
        raise JobFailedError(result)
    return {"job_id": job.id, "status": result.status}


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
    app.task(name=TASK_NAME, bind=True)(run_job)
