"""A huge prompt makes spans of a bounded size and export requests that fit the collector."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext, TraceFlags

from routerq.core.span_export import SpanQueue
from routerq.core.span_size import MAX_ATTRIBUTE_CHARS, MAX_REQUEST_BYTES, bounded, size_of

SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def span(n: int, attributes: dict[str, object], events: Sequence[Event] = ()) -> ReadableSpan:
    return ReadableSpan(
        name=f"s{n}", context=SpanContext(n + 1, n + 1, False, SAMPLED), attributes=attributes, events=events
    )


def test_a_30_mib_prompt_keeps_its_head_and_says_how_much_was_cut() -> None:
    prompt = "x" * (30 * 1024 * 1024)
    kept = bounded(span(1, {"input.value": prompt, "llm.model_name": "m", "routerq.attempt": 2}))
    value = kept.attributes["input.value"]  # type: ignore[index]
    assert isinstance(value, str) and value.startswith("x" * MAX_ATTRIBUTE_CHARS)
    assert value.endswith(
        f"[routerq cut {len(prompt) - MAX_ATTRIBUTE_CHARS:,} of {len(prompt):,} characters]"
    )
    assert kept.attributes["llm.model_name"] == "m" and kept.attributes["routerq.attempt"] == 2  # type: ignore[index]
    assert (kept.context, kept.name) == (span(1, {}).context, "s1")


def test_an_events_long_message_is_cut_too_and_a_small_span_is_left_as_it_is() -> None:
    event = Event("exception", {"exception.message": "e" * (MAX_ATTRIBUTE_CHARS + 5)}, timestamp=7)
    kept = bounded(span(1, {}, [event]))
    assert "routerq cut 5 of" in kept.events[0].attributes["exception.message"]  # type: ignore[index, operator]
    assert kept.events[0].timestamp == 7
    small = span(2, {"input.value": "hello"})
    assert bounded(small) is small


class Requests(SpanExporter):
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.sizes.append(sum(size_of(s) for s in spans))
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def test_big_spans_go_in_requests_that_fit_the_collector_and_none_is_lost() -> None:
    requests = Requests()
    queue = SpanQueue(requests)
    for n in range(40):  # 40 spans of ~2 x 100 K characters: ~8 MB, more than one request's worth
        queue.on_end(span(n, {"input.value": "i" * 10**6, "output.value": "o" * 10**6}))
    assert queue.force_flush(10_000)
    queue.shutdown()
    assert requests.spans == 40 and queue.counts.sent == 40
    assert len(requests.sizes) >= 1 and all(size <= MAX_REQUEST_BYTES for size in requests.sizes)


def test_a_request_is_split_by_bytes_before_it_outgrows_the_limit() -> None:
    requests = Requests()
    queue = SpanQueue(requests)
    big = MAX_ATTRIBUTE_CHARS  # each attribute at the cap: ~20 such attributes make 2 MB a span
    for n in range(12):
        queue.on_end(span(n, {f"a{k}": "z" * big for k in range(20)}))
    assert queue.force_flush(10_000)
    queue.shutdown()
    assert requests.spans == 12 and len(requests.sizes) >= 3
    assert all(size <= MAX_REQUEST_BYTES for size in requests.sizes)
