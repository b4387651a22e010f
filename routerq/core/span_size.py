"""Spans of a bounded size: a 30 MiB prompt must not make a 188 MB export request.

OTLP collectors refuse a request over their limit (Phoenix's is 64 MiB) and every retry of it is
refused again, while the process's later spans queue behind it. So each string attribute (a
prompt, an answer, an event's message) keeps its head, up to MAX_ATTRIBUTE_CHARS, and says how much
was cut; and an export request carries spans up to MAX_REQUEST_BYTES, never one request that can
never fit. The span is rebuilt through ReadableSpan's public constructor (the SDK's own span limits
cut silently and say nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.trace import Event, ReadableSpan

# What Phoenix's span view can show and a person can read: a long document, not a 30 MiB dump.
MAX_ATTRIBUTE_CHARS = 100_000
# An export request's share of the collector's 64 MiB limit, with room for encoding overhead.
MAX_REQUEST_BYTES = 8 * 1024 * 1024
SPAN_OVERHEAD_BYTES = 512  # ids, times, names, resource: what a span costs beyond its attribute values


def cut(text: str, limit: int = MAX_ATTRIBUTE_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [routerq cut {len(text) - limit:,} of {len(text):,} characters]"


def _capped(attributes: Mapping[str, Any] | None) -> tuple[dict[str, Any] | None, bool]:
    if not attributes:
        return (dict(attributes) if attributes is not None else None), False
    changed = False
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if isinstance(value, str) and len(value) > MAX_ATTRIBUTE_CHARS:
            value, changed = cut(value), True
        out[key] = value
    return out, changed


def bounded(span: ReadableSpan) -> ReadableSpan:
    """The span itself when every string attribute fits; else a copy with the long ones cut."""
    attributes, changed = _capped(span.attributes)
    events = []
    for event in span.events:
        event_attributes, event_changed = _capped(event.attributes)
        changed = changed or event_changed
        events.append(Event(event.name, event_attributes, event.timestamp) if event_changed else event)
    if not changed:
        return span
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def size_of(span: ReadableSpan) -> int:
    """About what the span weighs in an export request (its attribute values dominate)."""
    total = SPAN_OVERHEAD_BYTES
    for attributes in (span.attributes, *(e.attributes for e in span.events)):
        for value in (attributes or {}).values():
            total += len(value) if isinstance(value, str) else 16
    return total
