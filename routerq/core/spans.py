"""Span attribute extraction, kept apart from the code that makes calls (as OpenInference does)."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from openinference.instrumentation import REDACTED_VALUE as REDACTED
from openinference.instrumentation import TraceConfig
from openinference.semconv.trace import OpenInferenceSpanKindValues, SpanAttributes
from opentelemetry.trace import Span

from routerq.core.jobs import Job

PROVIDER = "openrouter"
GENERATION_ID = "openrouter.generation_id"
UPSTREAM_PROVIDER = "openrouter.provider"
ERROR_CODE = "openrouter.error.code"
ERROR_MESSAGE = "openrouter.error.message"
ERROR_REASONS = "openrouter.error.reasons"
HTTP_STATUS = "http.response.status_code"
JOB_ID = "routerq.job.id"
JOB_KIND = "routerq.job.kind"
QUEUE_WAIT_MS = "routerq.queue_wait_ms"
ATTEMPT = "routerq.attempt"
ERROR_CLASS = "routerq.error.class"
OUTCOME = "routerq.outcome"  # a line that never ran: "cancelled"
DECISION = "routerq.decision"  # what the retry policy made of a failed attempt
BATCH_ID = "routerq.batch.id"
BATCH_LINE = "routerq.batch.line"
CUSTOM_ID = "routerq.custom_id"


def context_attributes(job: Job) -> dict[str, Any]:
    """session/user/metadata/tags as OpenInference spells them; they do not cross the broker alone."""
    attributes: dict[str, Any] = {}
    if job.session_id:
        attributes[SpanAttributes.SESSION_ID] = job.session_id
    if job.user_id:
        attributes[SpanAttributes.USER_ID] = job.user_id
    if job.metadata:
        attributes[SpanAttributes.METADATA] = json.dumps(job.metadata)
    if job.tags:
        attributes[SpanAttributes.TAG_TAGS] = list(job.tags)
    return attributes


@cache
def _trace_config() -> TraceConfig:
    return TraceConfig()


def hide_inputs() -> bool:
    """OpenInference's OPENINFERENCE_HIDE_INPUTS applies to routerq's own spans too."""
    return bool(_trace_config().hide_inputs)


def hide_outputs() -> bool:
    return bool(_trace_config().hide_outputs)


def chain_kind() -> dict[str, Any]:
    return {SpanAttributes.OPENINFERENCE_SPAN_KIND: OpenInferenceSpanKindValues.CHAIN.value}


def chain_attributes(input_text: str) -> dict[str, Any]:
    """A CHAIN span's kind and input (unless inputs are hidden), for the root span of a trace."""
    return {**chain_kind(), SpanAttributes.INPUT_VALUE: REDACTED if hide_inputs() else input_text}


def output_attribute(text: str) -> str:
    return REDACTED if hide_outputs() else text


def producer_attributes(job: Job) -> dict[str, Any]:
    return {
        **chain_attributes(job.prompt_text),
        JOB_ID: job.id,
        JOB_KIND: job.kind.value,
        **context_attributes(job),
    }


def worker_attributes(job: Job, queue_wait_ms: float, attempt: int) -> dict[str, Any]:
    attributes = {
        JOB_ID: job.id,
        JOB_KIND: job.kind.value,
        QUEUE_WAIT_MS: round(queue_wait_ms, 3),
        ATTEMPT: attempt,
        SpanAttributes.LLM_MODEL_NAME: job.models[0],
        **context_attributes(job),
    }
    if job.batch_id:
        attributes[BATCH_ID] = job.batch_id
    if job.custom_id:
        attributes[CUSTOM_ID] = job.custom_id
    return attributes


def annotate_llm_span(span: Span, status_code: int, body: Any) -> None:
    """OpenRouter-only facts (cost, upstream provider, generation id, error) onto the LLM span."""
    if not span.is_recording():
        return
    span.set_attribute(SpanAttributes.LLM_PROVIDER, PROVIDER)
    span.set_attribute(HTTP_STATUS, status_code)
    if not isinstance(body, dict):
        return
    if isinstance(body.get("id"), str) and body["id"].startswith("gen-"):
        span.set_attribute(GENERATION_ID, body["id"])
    if isinstance(body.get("provider"), str):
        span.set_attribute(UPSTREAM_PROVIDER, body["provider"])
    for key, value in cost_attributes(body.get("usage")).items():
        span.set_attribute(key, value)
    error = body.get("error")
    if isinstance(error, dict):
        span.set_attribute(ERROR_CODE, str(error.get("code", "")))
        span.set_attribute(ERROR_MESSAGE, str(error.get("message", "")))
        reasons = (error.get("metadata") or {}).get("reasons")
        if isinstance(reasons, list):
            span.set_attribute(ERROR_REASONS, [str(r) for r in reasons])


def cost_attributes(usage: Any) -> dict[str, float]:
    """`usage.cost` is the total; the split exists only when OpenRouter reports upstream costs."""
    if not isinstance(usage, dict) or not isinstance(usage.get("cost"), int | float):
        return {}
    attributes = {SpanAttributes.LLM_COST_TOTAL: float(usage["cost"])}
    details = usage.get("cost_details") or {}
    prompt = details.get("upstream_inference_prompt_cost")
    completion = details.get("upstream_inference_completions_cost")
    if isinstance(prompt, int | float):
        attributes[SpanAttributes.LLM_COST_PROMPT] = float(prompt)
    if isinstance(completion, int | float):
        attributes[SpanAttributes.LLM_COST_COMPLETION] = float(completion)
    return attributes


def hide_vectors() -> bool:
    return bool(_trace_config().hide_embeddings_vectors)


def without_vectors(output_value: str) -> str | None:
    """An embeddings answer's raw JSON with each vector replaced by the redaction marker, or None when
    it holds none: OpenInference hides `embedding.vector` attributes but leaves them in `output.value`."""
    try:
        body = json.loads(output_value)
    except ValueError:
        return None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not any(isinstance(d, dict) and "embedding" in d for d in data):
        return None
    body["data"] = [{**d, "embedding": REDACTED} if isinstance(d, dict) else d for d in data]
    return json.dumps(body, separators=(",", ":"))
