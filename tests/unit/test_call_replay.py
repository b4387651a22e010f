"""Calls made untraced and replayed from their recording (worker.call_record): the replay must see exactly
what the call saw, never go upstream, and its span must carry the real call's times."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx2
import pytest
import redis
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext, TraceFlags

from routerq.core.span_export import SpanQueue
from routerq.worker.tracing.line_trace import LineTrace
from routerq.worker.tracing.tail_sampler import TailSampler
from routerq.worker.tracing.trace_budget import TraceBudget
from routerq.worker.upstream.call_record import Recording, replaying, untraced
from routerq.worker.upstream.openrouter import OpenRouterTransport

REQUEST = httpx2.Request("POST", "https://openrouter.test/api/v1/chat/completions", json={"model": "m"})


class Upstream(httpx2.AsyncBaseTransport):
    def __init__(self, status: int, body: bytes, error: Exception | None = None) -> None:
        self.calls = 0
        self.status, self.body, self.error = status, body, error

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return httpx2.Response(self.status, headers={"x-upstream": "yes"}, content=self.body, request=request)


def send(transport: OpenRouterTransport) -> httpx2.Response:
    return asyncio.run(transport.handle_async_request(REQUEST))


@pytest.mark.parametrize(
    "status, body",
    [
        (200, b'{"id": "gen-1", "choices": [{"message": {"content": "hi"}}]}'),
        (429, b'{"error": {"code": 429}}'),
    ],
)
def test_a_replayed_call_gets_what_the_call_got_without_going_upstream(status: int, body: bytes) -> None:
    upstream = Upstream(status, body)
    transport = OpenRouterTransport(upstream)
    recording = Recording()
    with untraced(recording):
        first = send(transport)
    with replaying(recording):
        again = send(transport)
    assert upstream.calls == 1
    assert (again.status_code, again.content, again.headers["x-upstream"]) == (first.status_code, body, "yes")


def test_a_200_with_an_error_is_normalized_again_on_replay() -> None:
    transport = OpenRouterTransport(Upstream(200, b'{"error": {"code": 503, "message": "provider down"}}'))
    recording = Recording()
    with untraced(recording):
        first = send(transport)
    with replaying(recording):
        again = send(transport)
    assert first.status_code == again.status_code == 503


def test_a_transport_error_is_raised_again_on_replay_and_a_call_cut_off_replays_as_a_timeout() -> None:
    upstream = Upstream(0, b"", httpx2.ConnectError("refused"))
    transport = OpenRouterTransport(upstream)
    recording = Recording()
    with untraced(recording), pytest.raises(httpx2.ConnectError):
        send(transport)
    with replaying(recording), pytest.raises(httpx2.ConnectError):
        send(transport)
    assert upstream.calls == 1
    with replaying(Recording()), pytest.raises(httpx2.ReadTimeout):
        send(transport)


class Collector(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def test_a_replayed_span_is_redated_to_the_real_call_and_its_events_move_with_its_end() -> None:
    collector = Collector()
    queue = SpanQueue(collector)
    nowhere = redis.Redis(port=1, socket_connect_timeout=0.1)  # the budget's tick fails quietly
    sampler = TailSampler(queue, TraceBudget(nowhere, None, lambda: queue.counts, 60), "p")
    trace_id = 7
    context = SpanContext(trace_id, 1, False, TraceFlags(TraceFlags.SAMPLED))
    sampler.hold(trace_id)
    sampler.on_end(ReadableSpan(name="earlier", context=context, start_time=10, end_time=20))
    since = sampler.held(trace_id)
    replayed = ReadableSpan(
        name="ChatCompletion",
        context=SpanContext(trace_id, 2, False, TraceFlags(TraceFlags.SAMPLED)),
        start_time=5_000_000_000,
        end_time=5_001_000_000,
        events=[Event("exception", {"exception.type": "APIStatusError"}, timestamp=5_001_000_000)],
    )
    sampler.on_end(replayed)
    sampler.redate(trace_id, since, start=100.0, end=101.5)
    sampler.release(trace_id, kept=True)
    assert queue.force_flush(5_000)
    sampler.shutdown()
    earlier, call = sorted(collector.spans, key=lambda s: s.context.span_id)
    assert (earlier.start_time, earlier.end_time) == (10, 20)
    assert (call.start_time, call.end_time) == (100_000_000_000, 101_500_000_000)
    assert [e.timestamp for e in call.events] == [101_500_000_000]


def test_a_replay_that_fails_never_fails_the_line(caplog: pytest.LogCaptureFixture) -> None:
    """The line goes on: the replay returns, the failure is logged, and the line's trace is still kept
    and sent, without that call's span."""
    collector = Collector()
    queue = SpanQueue(collector)
    nowhere = redis.Redis(port=1, socket_connect_timeout=0.1)
    sampler = TailSampler(queue, TraceBudget(nowhere, None, lambda: queue.counts, 60), "p")
    line = LineTrace(sampler, None, enqueued_at=0.0)
    earlier = ReadableSpan(
        name="earlier attempt",
        context=SpanContext(line.trace_id, 3, False, TraceFlags(TraceFlags.SAMPLED)),
        start_time=10,
        end_time=20,
    )

    async def broken() -> None:
        raise RuntimeError("a bug in the instrumentation")

    with line:
        sampler.on_end(earlier)
        asyncio.run(line.replay(Recording(status=200), broken))
        kept = line.decide(True, unwritten_calls=1)
        traced = line.finish(output="the answer", ok=True, kept=kept, project="p")
    assert queue.force_flush(5_000)
    sampler.shutdown()
    assert traced is True
    assert "replaying a call for its trace failed" in caplog.text
    assert [s.name for s in collector.spans] == ["earlier attempt"]  # sent; no span of the broken call
