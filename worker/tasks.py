"""The tasks: a single job (`routerq.run_job`) and one line of a batch (`routerq.run_line`)."""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

from celery import Celery, Task
from openinference.instrumentation import using_attributes
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from routerq.batches import Batch, Outcome, output_line
from routerq.jobs import Job, JobError, JobFailedError, JobKind, JobResult
from routerq.spans import worker_attributes
from worker.app import EMBED_TASK_NAME, LINE_TASK_NAME, TASK_NAME
from worker.runtime import Runtime, runtime

log = logging.getLogger(__name__)


def execute(rt: Runtime, task: Task, job: Job) -> JobResult:
    """One upstream attempt for a job, with the job's context on every span it makes."""
    started = time.time()
    span = trace.get_current_span()
    attempt = (task.request.retries or 0) + 1
    for key, value in worker_attributes(job, (started - job.enqueued_at) * 1000, attempt).items():
        span.set_attribute(key, value)
    rt.pricing.ensure(job.models)
    with using_attributes(**_context_kwargs(job)):
        answer = rt.openrouter.call(job)
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
        usage=answer.usage,
        attempts=attempt,
        enqueued_at=job.enqueued_at,
        started_at=started,
        finished_at=time.time(),
        batch_id=job.batch_id,
        custom_id=job.custom_id,
        trace_id=_trace_id(span),
    )
    if answer.error:
        span.set_status(Status(StatusCode.ERROR, answer.error.message))
    return result


def run_job(task: Task, payload: dict[str, Any]) -> dict[str, Any]:
    job = Job.model_validate(payload)
    rt = runtime(task.app)
    stored = rt.store.get(job.id)
    if stored is not None and stored.ok:
        log.info("job %s already has a stored result; not calling upstream again", job.id)
        return {"job_id": job.id, "status": stored.status}
    result = execute(rt, task, job)
    rt.store.put(result)
    if not result.ok:
        raise JobFailedError(result)
    return {"job_id": job.id, "status": result.status}


def run_line(task: Task, batch_id: str, index: int, enqueued_at: float) -> dict[str, Any]:
    rt = runtime(task.app)
    span = trace.get_current_span()
    span.set_attribute("routerq.batch.id", batch_id)
    span.set_attribute("routerq.batch.line", index)
    batch = rt.batches.get(batch_id)
    line = rt.batches.line(batch_id, index)
    if batch is None or line is None:
        log.warning("batch %s line %d has expired or never existed; dropping it", batch_id, index)
        return {"batch_id": batch_id, "index": index, "status": "missing"}
    if rt.batches.outcome(batch_id, index) is Outcome.SUCCEEDED:
        log.info("batch %s line %d already succeeded; not calling upstream again", batch_id, index)
        return {"batch_id": batch_id, "index": index, "status": "succeeded"}
    if not batch.status.runnable:
        error = JobError(
            code="batch_cancelled", message=f"batch is {batch.status.value}; line not sent upstream"
        )
        line_out = {"id": None, "custom_id": line["custom_id"], "response": None, "error": error.model_dump()}
        rt.batches.record(batch_id, index, Outcome.CANCELLED, line_out, None)
        return {"batch_id": batch_id, "index": index, "status": "cancelled"}

    rt.batches.mark_running(batch_id, index)
    job = line_job(batch, index, line, enqueued_at)
    result = execute(rt, task, job)
    outcome = Outcome.SUCCEEDED if result.ok else Outcome.FAILED
    rt.batches.record(batch_id, index, outcome, output_line(job.custom_id or "", result), result)
    if not result.ok:
        raise JobFailedError(result)
    return {"batch_id": batch_id, "index": index, "status": result.status}


def run_embed(task: Task, run_id: str, indexes: list[int], enqueued_at: float) -> dict[str, Any]:
    """One embeddings request for many texts; vectors are stored as raw float32, never as JSON text."""
    rt = runtime(task.app)
    run = rt.embeddings.get(run_id)
    if run is None:
        log.warning("embedding run %s has expired; dropping its request", run_id)
        return {"run": run_id, "stored": 0}
    todo = rt.embeddings.missing_of(run_id, indexes)
    if not todo:
        return {"run": run_id, "stored": 0}
    texts = rt.embeddings.texts(run_id, todo)
    body: dict[str, Any] = {"model": run.model, "input": texts, "encoding_format": "base64"}
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
    result = execute(rt, task, job)
    if not result.ok or result.response is None:
        rt.embeddings.record_failure(run_id, len(todo))
        raise JobFailedError(result)
    vectors = {todo[item["index"]]: base64.b64decode(item["embedding"]) for item in result.response["data"]}
    usage = result.usage
    stored = rt.embeddings.store_vectors(
        run_id, vectors, usage.prompt_tokens if usage else 0, usage.cost or 0.0 if usage else 0.0
    )
    return {"run": run_id, "stored": stored}


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
    app.task(name=TASK_NAME, bind=True)(run_job)
    app.task(name=LINE_TASK_NAME, bind=True)(run_line)
    app.task(name=EMBED_TASK_NAME, bind=True)(run_embed)
