"""The producer API: put jobs on the queue from any Python service, and wait for them if wanted."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from openinference.semconv.trace import SpanAttributes
from opentelemetry import propagate
from opentelemetry.trace import Span, Status, StatusCode

from routerq.core import envelope, telemetry
from routerq.core.broker import TASK_NAME
from routerq.core.errors import JobFailedError
from routerq.core.job_chain import waiting_note
from routerq.core.jobs import Job, JobKind, JobResult
from routerq.core.redis_client import connect
from routerq.core.result_store import ResultStore
from routerq.core.settings import Settings, get_settings
from routerq.core.spans import output_attribute, producer_attributes


class JobHandle:
    """A queued job; `get` waits for its result like Celery's AsyncResult.get."""

    def __init__(self, job: Job, store: ResultStore) -> None:
        self.job = job
        self.id = job.id
        self._store = store

    def get(self, timeout: float | None = None, propagate: bool = True) -> JobResult:
        result = self._store.wait(self.id, timeout)
        if propagate and not result.ok:
            raise JobFailedError(result)
        return result

    def result(self) -> JobResult | None:
        """The stored result, or None while the job is queued or running."""
        return self._store.get(self.id)


class Producer:
    def __init__(self, settings: Settings | None = None, *, tracing: bool = True) -> None:
        self.settings = settings or get_settings()
        if tracing:
            telemetry.setup_tracing(self.settings)
        self.redis = connect(self.settings.redis_url)
        self.store = ResultStore(self.redis, self.settings.result_ttl, self.settings.queue)

    def enqueue(
        self,
        body: Mapping[str, Any],
        *,
        kind: JobKind | str = JobKind.CHAT,
        session_id: str | None = None,
        user_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        tags: Sequence[str] | None = None,
    ) -> JobHandle:
        """Queue one OpenAI-compatible request body; returns at once."""
        job = Job(
            kind=JobKind(kind),
            body=dict(body),
            session_id=session_id,
            user_id=user_id,
            metadata=dict(metadata or {}),
            tags=list(tags or []),
        )
        return self.submit(job)

    def submit(self, job: Job) -> JobHandle:
        job.project = job.project or telemetry.traced_project(self.settings)
        with self._job_span("routerq.enqueue", job) as span:
            self._publish(job)
            span.set_attribute(
                SpanAttributes.OUTPUT_VALUE, json.dumps({"job_id": job.id, "status": "queued"})
            )
            span.set_attribute(SpanAttributes.OUTPUT_MIME_TYPE, "application/json")
            span.set_status(Status(StatusCode.OK))  # queued: the job's own outcome is its worker span's
        return JobHandle(job, self.store)

    def result(self, job_id: str, timeout: float | None = None) -> JobResult | None:
        """A job's stored result by id (from another process, or before a restart); None while it is
        queued or running. With `timeout`, waits that long for it (ResultTimeoutError after)."""
        if timeout is None:
            return self.store.get(job_id)
        return self.store.wait(job_id, timeout)

    def run(
        self, job: Job, timeout: float | None = None, on_wait: Callable[[str], None] | None = None
    ) -> JobResult:
        """Queue and wait inside one span, whose output is the answer (reads well in Sessions).
        `on_wait` hears why the job waits (a rate limit, a retry's countdown) each time that changes."""
        job.project = job.project or telemetry.traced_project(self.settings)
        heard: list[str] = []

        def report() -> None:
            note = waiting_note(self.redis, job.id)
            if on_wait is not None and note and note not in heard[-1:]:
                heard.append(note)
                on_wait(note)

        with self._job_span("routerq.job", job) as span:
            self._publish(job)
            result = self.store.wait(job.id, timeout, report)
            if result.ok:
                span.set_attribute(SpanAttributes.OUTPUT_VALUE, output_attribute(result.text))
                span.set_status(Status(StatusCode.OK))
            else:
                failure = JobFailedError(result)
                span.set_attribute(SpanAttributes.OUTPUT_VALUE, output_attribute(str(failure)))
                span.set_status(Status(StatusCode.ERROR, str(failure)))
        return result

    def _publish(self, job: Job) -> None:
        """The job's message (carrying the current span's context, which the worker's run span
        continues) and its pending record, in one transaction: both or neither."""
        args = [job.model_dump(mode="json")]
        headers = envelope.headers(TASK_NAME, job.id, args)
        propagate.inject(headers)
        queue = self.settings.queue
        pipe = self.redis.pipeline(transaction=True)
        self.store.pend(job, pipe)
        pipe.lpush(queue, envelope.build(job.id, headers, args, queue))  # kombu's publish: LPUSH
        pipe.execute()

    @contextmanager
    def _job_span(self, name: str, job: Job) -> Iterator[Span]:
        with telemetry.tracer().start_as_current_span(name, attributes=producer_attributes(job)) as span:
            yield span

    def close(self) -> None:
        telemetry.flush()
