"""Tail sampling inside the worker: a trace's spans are held until its work ends, then kept or dropped whole.

A batch line's spans are all made in one worker process during one attempt, so the decision can wait
for the outcome (worker.trace_budget says how many successes fit). Held spans also get what must hold
for every span of the trace before export: the job's Phoenix project, and no embedding vectors in
`output.value` when OPENINFERENCE_HIDE_EMBEDDINGS_VECTORS is set.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from openinference.semconv.resource import ResourceAttributes
from openinference.semconv.trace import OpenInferenceSpanKindValues, SpanAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor

from routerq.core.redis_client import connect
from routerq.core.settings import Settings
from routerq.core.span_export import SpanQueue
from routerq.core.spans import hide_vectors, without_vectors
from routerq.worker.tracing.trace_budget import TraceBudget

_EMBEDDING = OpenInferenceSpanKindValues.EMBEDDING.value


@dataclass
class SampleCounts:
    kept: int = 0  # traces sent whole
    sampled_out: int = 0  # successful traces the budget had no room for


class TailSampler(SpanProcessor):
    """In front of the export queue. Spans of traces nobody holds pass straight through."""

    def __init__(self, queue: SpanQueue, budget: TraceBudget, project: str) -> None:
        self._queue = queue
        self._budget = budget
        self._project = project
        self._held: dict[int, list[ReadableSpan]] = {}
        self._lock = threading.Lock()
        self._hide_vectors = hide_vectors()
        self.counts = SampleCounts()

    def hold(self, trace_id: int) -> None:
        """Hold the trace's spans until `settle`."""
        with self._lock:
            self._held.setdefault(trace_id, [])

    def would_drop(self, trace_id: int) -> bool:
        """Whether the trace, should its line succeed plainly, is one the budget has no room for now."""
        return self._budget.would_drop(trace_id)

    def decide(self, trace_id: int, always: bool, more: int = 0) -> bool:
        """Whether the held trace, with `more` spans still to be written, goes to Phoenix; charged to
        the budget either way."""
        with self._lock:
            spans = len(self._held.get(trace_id, ())) + more
        if always:
            self._budget.always(spans)
            return True
        return self._budget.keep(trace_id, spans)

    def settle(self, trace_id: int, always: bool, project: str | None = None) -> bool:
        """Send the held trace when it must be kept or fits in the budget, into `project` (the job's
        Phoenix project) when it is not this worker's; drop it otherwise."""
        kept = self.decide(trace_id, always)
        self.release(trace_id, kept, project)
        return kept

    def release(self, trace_id: int, kept: bool, project: str | None = None) -> None:
        """Send or drop the held trace, as decided."""
        with self._lock:
            held = self._held.pop(trace_id, None)
        if held is None:
            return
        if not kept:
            self.counts.sampled_out += 1
            return
        self.counts.kept += 1
        project = project if project != self._project else None
        for span in held:
            self._forward(span, project)

    def held(self, trace_id: int) -> int:
        with self._lock:
            return len(self._held.get(trace_id, ()))

    def redate(self, trace_id: int, since: int, start: float, end: float) -> None:
        """The held spans from the `since`-th on were made by a replay: they get the real call's times
        (epoch seconds), their events moved with their end."""
        start_ns, end_ns = int(start * 1e9), int(end * 1e9)
        with self._lock:
            held = self._held.get(trace_id, [])
            for n in range(since, len(held)):
                span = held[n]
                shift = end_ns - (span.end_time or end_ns)
                events = [Event(e.name, e.attributes, e.timestamp + shift) for e in span.events]
                held[n] = _copy(span, start_time=start_ns, end_time=end_ns, events=events)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            held = self._held.get(span.context.trace_id)
            if held is not None:
                held.append(span)
                return
        self._forward(span, None)

    def _forward(self, span: ReadableSpan, project: str | None) -> None:
        attributes = span.attributes or {}
        output = attributes.get(SpanAttributes.OUTPUT_VALUE)
        scrubbed = None
        if (
            self._hide_vectors
            and isinstance(output, str)
            and attributes.get(SpanAttributes.OPENINFERENCE_SPAN_KIND) == _EMBEDDING
        ):
            scrubbed = without_vectors(output)
        if project is None and scrubbed is None:
            self._queue.on_end(span)
            return
        changes: dict[str, Any] = {}
        if project:
            changes["resource"] = _resource(span.resource, project)
        if scrubbed:
            changes["attributes"] = {**attributes, SpanAttributes.OUTPUT_VALUE: scrubbed}
        self._queue.on_end(_copy(span, **changes))

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._queue.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self._budget.stop()
        self._queue.shutdown()


def _copy(span: ReadableSpan, **changes: Any) -> ReadableSpan:
    """The span as it is, but for `changes` (ReadableSpan's own arguments)."""
    fields: dict[str, Any] = {
        "name": span.name,
        "context": span.context,
        "parent": span.parent,
        "resource": span.resource,
        "attributes": span.attributes,
        "events": span.events,
        "links": span.links,
        "kind": span.kind,
        "status": span.status,
        "start_time": span.start_time,
        "end_time": span.end_time,
        "instrumentation_scope": span.instrumentation_scope,
    }
    return ReadableSpan(**{**fields, **changes})


@cache
def _resource(base: Resource, project: str) -> Resource:
    """Phoenix files a span under its resource's project: one Resource per project, made once."""
    return base.merge(Resource({ResourceAttributes.PROJECT_NAME: project}))


_sampler: TailSampler | None = None


def installer(settings: Settings) -> Callable[[SpanQueue], SpanProcessor]:
    """For telemetry.setup_tracing: puts this process's sampler in front of its export queue."""

    def install(queue: SpanQueue) -> SpanProcessor:
        global _sampler
        budget = TraceBudget(
            connect(settings.redis_url), settings.trace_budget, lambda: queue.counts, settings.result_ttl
        )
        _sampler = TailSampler(queue, budget, settings.phoenix_project_name)
        return _sampler

    return install


def sampler() -> TailSampler | None:
    """This process's sampler; None when it does not trace."""
    return _sampler
