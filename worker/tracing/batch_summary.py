"""The batch summary trace: one root span in the batch's Phoenix session, written when the batch ends.

With most successful lines sampled out of Phoenix, this is where a batch is seen whole: lines by
outcome, tokens, cost, latency and queue-wait percentiles, retries, and how many lines were traced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from openinference.semconv.trace import SpanAttributes
from opentelemetry import context as otel_context
from opentelemetry.trace import Status, StatusCode

from routerq.core import telemetry
from routerq.core.batch_store import Batch, BatchStats
from routerq.core.rate_state import ModelRate
from routerq.core.spans import BATCH_ID, chain_kind
from routerq.worker.tracing.tail_sampler import TailSampler

SUMMARY_NAME = "routerq.batch"
PREFIX = "routerq.batch."


def summary(batch: Batch, stats: BatchStats) -> dict[str, Any]:
    """The summary as plain data: the span's attributes (prefixed) and its output (as JSON)."""
    data: dict[str, Any] = {
        "status": batch.status.value,
        "lines": batch.total,
        "succeeded": batch.succeeded,
        "failed": batch.failed,
        "cancelled": batch.cancelled,
        "retries": batch.retries,
        "prompt_tokens": batch.prompt_tokens,
        "completion_tokens": batch.completion_tokens,
        "cost": batch.cost,
        "lines_traced": batch.traced,
        "lines_sampled_out": batch.sampled_out,
    }
    for name, values in (("latency_ms", stats.latency_ms), ("queue_wait_ms", stats.queue_wait_ms)):
        for q, value in values.items():
            if value is not None:
                data[f"{name}.p{round(q * 100)}"] = round(value, 1)
    return data


def write_summary(
    sampler: TailSampler, batch: Batch, stats: BatchStats, rates: Sequence[ModelRate] = ()
) -> None:
    """Always kept, whatever the budget: it is one span per batch. `rates`: what the shared limiter
    found for each model it paces (routerq.core.rate_state), as the batch ended."""
    data = summary(batch, stats)
    if rates:
        data["model_rates"] = json.dumps([
            {"model": r.model, "rate": r.rate, "refused_share": round(r.refused_share, 4), "noise": r.noise}
            for r in rates
        ])  # fmt: skip
    attributes: dict[str, Any] = {
        **chain_kind(),
        **{PREFIX + key: value for key, value in data.items()},
        BATCH_ID: batch.id,
        SpanAttributes.SESSION_ID: batch.session_id or batch.id,
        SpanAttributes.INPUT_VALUE: f"{batch.name or batch.input_file or batch.id}: {batch.total} lines",
        SpanAttributes.OUTPUT_VALUE: json.dumps(data),
        SpanAttributes.OUTPUT_MIME_TYPE: "application/json",
    }
    if batch.user_id:
        attributes[SpanAttributes.USER_ID] = batch.user_id
    ended = batch.completed_at or batch.cancelled_at or time.time()
    span = telemetry.tracer().start_span(
        SUMMARY_NAME,
        context=otel_context.Context(),
        start_time=int(batch.created_at * 1e9),
        attributes=attributes,
    )
    trace_id = span.get_span_context().trace_id
    sampler.hold(trace_id)
    if batch.failed:
        span.set_status(Status(StatusCode.ERROR, f"{batch.failed} of {batch.total} lines failed"))
    else:
        span.set_status(Status(StatusCode.OK))
    span.end(end_time=int(ended * 1e9))
    sampler.settle(trace_id, always=True, project=batch.project)
