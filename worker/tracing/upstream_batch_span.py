"""One span per OpenRouter batch (`--via batch`): its id, counts, usage and how long it waited, in
the session of the batch or embedding run it served. Spans made inside it are its children."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from openinference.semconv.trace import OpenInferenceSpanKindValues, SpanAttributes
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from routerq.core import telemetry
from routerq.worker.tracing.tail_sampler import sampler

UPSTREAM_SPAN = "routerq.upstream_batch"


def mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@contextmanager
def upstream_batch_span(
    found: dict[str, Any],
    upstream_id: str,
    submitted_at: float,
    session_id: str,
    project: str | None,
    attributes: dict[str, Any] | None = None,
) -> Iterator[otel_context.Context | None]:
    """Yields the context to make child spans in (None when this worker does not trace); the span
    is always kept, as a batch summary is."""
    current = sampler()
    if current is None:
        yield None
        return
    counts, usage = mapping(found.get("request_counts")), mapping(found.get("usage"))
    ended = float(found.get("finalized_at") or time.time())
    values: dict[str, Any] = {
        SpanAttributes.OPENINFERENCE_SPAN_KIND: OpenInferenceSpanKindValues.CHAIN.value,
        SpanAttributes.SESSION_ID: session_id,
        "openrouter.batch_id": upstream_id,
        "openrouter.batch.status": str(found.get("status")),
        "openrouter.batch.model": str(found.get("model")),
        "openrouter.batch.waited_s": round(ended - submitted_at, 3),
        SpanAttributes.INPUT_VALUE: f"{counts.get('total', 0)} requests to {found.get('model')}",
        SpanAttributes.OUTPUT_VALUE: json.dumps(
            {"status": found.get("status"), "request_counts": counts, "usage": usage}
        ),
        SpanAttributes.OUTPUT_MIME_TYPE: "application/json",
        **(attributes or {}),
    }
    for name in ("total", "completed", "failed"):
        if isinstance(counts.get(name), int):
            values[f"openrouter.batch.{name}"] = counts[name]
    if isinstance(usage.get("cost"), int | float):
        values[SpanAttributes.LLM_COST_TOTAL] = float(usage["cost"])
    span = telemetry.tracer().start_span(
        UPSTREAM_SPAN, context=otel_context.Context(), start_time=int(submitted_at * 1e9), attributes=values
    )
    trace_id = span.get_span_context().trace_id
    current.hold(trace_id)
    try:
        yield trace.set_span_in_context(span, otel_context.Context())
    finally:
        span.set_status(
            Status(StatusCode.OK)
            if found.get("status") == "completed"
            else Status(StatusCode.ERROR, str(found.get("status")))
        )
        span.end(end_time=int(ended * 1e9))
        current.settle(trace_id, always=True, project=project)
