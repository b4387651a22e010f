"""The pure parts of trace sampling: which trace ids a fraction keeps, how the fraction follows the
budget, which lines count as slow, and an export queue that never loses a span silently."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext, TraceFlags

from routerq.core.span_export import Listening, SpanQueue
from routerq.worker.tracing.slow_lines import SLOW_SLACK, SlowLines
from routerq.worker.tracing.trace_budget import fraction, ratio_keeps


def test_a_fraction_keeps_the_same_trace_ids_every_time_and_about_that_share_of_them() -> None:
    rng = random.Random(3)
    ids = [rng.getrandbits(128) for _ in range(20_000)]
    kept = [i for i in ids if ratio_keeps(i, 0.25)]
    assert kept == [i for i in ids if ratio_keeps(i, 0.25)]
    assert 0.23 < len(kept) / len(ids) < 0.27
    assert all(ratio_keeps(i, 1.0) for i in ids) and not any(ratio_keeps(i, 0.0) for i in ids)
    assert set(kept) <= {i for i in ids if ratio_keeps(i, 0.5)}  # a larger fraction keeps a superset


def test_always_kept_spans_are_charged_first_and_successes_get_what_is_left() -> None:
    assert fraction(budget=100, forced=0, wanted=400) == 0.25
    assert fraction(budget=100, forced=60, wanted=400) == 0.1
    assert fraction(budget=100, forced=150, wanted=400) == 0.0
    assert fraction(budget=100, forced=0, wanted=50) == 1.0
    assert fraction(budget=100, forced=0, wanted=0) == 1.0


def test_a_line_is_slow_over_the_threshold_or_over_its_batchs_p99_once_100_lines_are_recorded() -> None:
    recorded = {"b1": (250, 800.0), "b2": (40, 300.0)}  # lines recorded, p99 in ms, as Redis would say
    fetched: list[str] = []

    async def fetch(batch_id: str) -> tuple[int, float | None]:
        fetched.append(batch_id)
        return recorded.get(batch_id, (0, None))

    async def check() -> None:
        slow = SlowLines(threshold_s=30, fetch=fetch)
        assert await slow.is_slow("b1", 31.0)  # over the threshold: no need to ask
        assert await slow.is_slow("b1", 0.9) and not await slow.is_slow("b1", 0.7)
        assert not await slow.is_slow("b2", 5.0)  # 40 lines: its p99 is not trusted yet
        assert not await slow.is_slow("b3", 5.0)  # nothing recorded
        assert fetched == ["b1", "b2", "b3"]  # once per batch, not once per line

    asyncio.run(check())


class Collector(SpanExporter):
    """Stands in for Phoenix's OTLP endpoint: refuses the first `refuse` requests, as a full Phoenix does."""

    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.received: list[ReadableSpan] = []
        self.requests = 0
        self.lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.lock:
            self.requests += 1
            if self.requests <= self.refuse:
                return SpanExportResult.FAILURE
            self.received.extend(spans)
            return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _span(n: int) -> ReadableSpan:
    return ReadableSpan(
        name=f"s{n}", context=SpanContext(n + 1, n + 1, False, TraceFlags(TraceFlags.SAMPLED))
    )


def test_spans_a_full_collector_refuses_are_sent_again_after_a_backoff_not_lost() -> None:
    collector = Collector(refuse=3)
    queue = SpanQueue(collector, first_backoff_s=0.01)
    for n in range(50):
        queue.on_end(_span(n))
    assert queue.force_flush(5_000)
    assert sorted(s.name for s in collector.received) == sorted(f"s{n}" for n in range(50))
    assert (queue.counts.sent, queue.counts.dropped) == (50, 0)
    queue.shutdown()


def test_spans_that_cannot_be_delivered_or_do_not_fit_are_counted_as_dropped() -> None:
    collector = Collector(refuse=1_000_000)
    queue = SpanQueue(collector, max_queue=10, max_retry_s=0.05, first_backoff_s=0.01)
    for n in range(25):
        queue.on_end(_span(n))
    queue.force_flush(5_000)
    queue.shutdown()
    counts = queue.counts
    assert counts.sent == 0 and counts.dropped == 25
    assert counts.queue_full > 0 and counts.refused > 0


def test_a_producer_gives_up_at_once_on_spans_for_a_phoenix_that_is_not_running() -> None:
    """Nothing listening is not a busy Phoenix: no backoff, no exporter retries, nothing to wait for."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        collector = Collector()
        listening = Listening(f"http://user:pw@127.0.0.1:{port}/v1/traces")
        queue = SpanQueue(collector, listening=listening, drop_unheard=True)
        for n in range(5):
            queue.on_end(_span(n))
        assert queue.force_flush(5_000)
        queue.shutdown()
    assert collector.requests == 0
    assert (queue.counts.sent, queue.counts.refused, queue.counts.retried) == (0, 5, 0)


def test_a_worker_says_once_that_nothing_listens_and_keeps_its_spans_for_when_phoenix_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        collector = Collector(refuse=4)  # what the exporter answers while nothing listens
        listening = Listening(f"http://127.0.0.1:{port}/v1/traces")
        queue = SpanQueue(collector, listening=listening, first_backoff_s=0.01)
        for n in range(3):
            queue.on_end(_span(n))
        assert queue.force_flush(5_000)
        queue.shutdown()
    said = [r.getMessage() for r in caplog.records if "routerq" in r.getMessage()]
    assert said == [
        f"routerq: nothing listens at http://127.0.0.1:{port} (PHOENIX_COLLECTOR_ENDPOINT): spans wait "
        "here and are sent when it answers; jobs are unaffected"
    ], said  # one line, and never "Phoenix is refusing spans"
    assert (queue.counts.sent, queue.counts.refused) == (3, 0)


def test_a_listening_phoenix_is_exported_to_and_its_address_shown_without_credentials() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        listening = Listening(f"http://user:pw@127.0.0.1:{port}/v1/traces")
        assert listening()
        assert listening.where == f"http://127.0.0.1:{port}"
        collector = Collector()
        queue = SpanQueue(collector, listening=listening)
        queue.on_end(_span(1))
        assert queue.force_flush(5_000)
        queue.shutdown()
    assert (collector.requests, queue.counts.sent) == (1, 1)


def test_latencies_drifting_past_the_p99_keep_no_more_than_one_percent_of_lines_as_slow() -> None:
    async def fetch(batch_id: str) -> tuple[int, float | None]:
        return 1000, 250.0  # the p99 of the lines so far; every new line is slower (a busier machine)

    async def check() -> int:
        slow = SlowLines(threshold_s=30, fetch=fetch)
        return sum([await slow.is_slow("b1", 0.3) for _ in range(2000)])

    kept = asyncio.run(check())
    assert 20 <= kept <= 20 + SLOW_SLACK


def test_a_line_far_over_the_p99_is_kept_however_many_slow_lines_were() -> None:
    async def fetch(batch_id: str) -> tuple[int, float | None]:
        return 1000, 250.0

    async def check() -> bool:
        slow = SlowLines(threshold_s=30, fetch=fetch)
        for _ in range(2000):
            await slow.is_slow("b1", 0.3)  # drifting: the allowance is used up
        return await slow.is_slow("b1", 1.5)  # six times the p99: this line is slow

    assert asyncio.run(check())
