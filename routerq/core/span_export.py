"""The span export queue: finished spans buffered in a bounded queue and sent in batches from one thread.

It does what the SDK's BatchSpanProcessor does, plus what that one cannot: a batch Phoenix refuses
(503 when its ingest queue is full, or any failure) is kept and sent again with backoff instead of
being lost, and every span that is finally not delivered, refused or pushed out of a full queue, is
counted. A job never waits for any of it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from routerq.core.export_counts import ExportCounts
from routerq.core.span_size import MAX_REQUEST_BYTES, bounded, size_of

log = logging.getLogger(__name__)

# Spans buffered per process. A sampled batch sends far fewer than this per second; an unsampled
# one (ROUTERQ_TRACE_BUDGET=all, or a 50,000-line submit) may outrun Phoenix for minutes.
MAX_QUEUE = 131_072
MAX_BATCH = 1_024  # spans per export request: one request of ~1 MB at LLM-span sizes
SCHEDULE_S = 1.0  # a quiet process sends its spans within this long (callers may choose longer)
# A refused batch is tried again after 1, 2, 4 ... seconds, up to this; Phoenix drains its own
# queue at 150-250 spans/s, so a second or two is usually enough.
MAX_BACKOFF_S = 16.0
# A span not delivered after this long is counted as dropped: Phoenix has been down or full for
# minutes, and the queue must make room for new spans.
MAX_RETRY_S = 300.0
REPORT_EVERY_S = 30.0
SHUTDOWN_S = 10.0
# How long a producer waits for a TCP connection to the collector before taking it as not there: a
# loopback or LAN Phoenix answers within milliseconds.
PROBE_TIMEOUT_S = 0.5


class Listening:
    """Whether anything accepts connections at the collector's address. A refused connection is not
    a busy Phoenix but no Phoenix: backing off (the OTLP exporter does too, within its own timeout) only
    delays a producer's exit by seconds for spans that cannot be delivered."""

    def __init__(self, url: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "localhost", parts.port or (443 if parts.scheme == "https" else 80))
        self.where = f"{parts.scheme}://{self.address[0]}:{self.address[1]}"  # no credentials, no path
        self._timeout = timeout_s

    def __call__(self) -> bool:
        try:
            socket.create_connection(self.address, self._timeout).close()
        except OSError:
            return False
        return True


class SpanQueue(SpanProcessor):
    """A bounded span queue with a sender thread that backs off on refusals and counts every loss."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue: int = MAX_QUEUE,
        max_retry_s: float = MAX_RETRY_S,
        first_backoff_s: float = 1.0,
        hold_until: Callable[[], float] = lambda: 0.0,
        listening: Listening | None = None,
        every_s: float = SCHEDULE_S,
        drop_unheard: bool = False,
    ) -> None:
        """`listening` tells a Phoenix that is not there from one that refuses. With `drop_unheard`
        (a producer, about to exit) it is asked before each export, and with nothing there the spans
        are counted as refused at once; otherwise (a worker) it is asked when an export fails, to say
        so in one line while the spans wait out the outage. Spans are sent every `every_s` seconds, or
        as soon as a full request's worth is queued."""
        self._exporter = exporter
        self._every_s = every_s
        self._listening = listening
        self._drop_unheard = drop_unheard
        self._said_not_listening = False
        self._max_queue = max_queue
        self._max_retry_s = max_retry_s
        self._hold_until = hold_until
        self._queue: deque[ReadableSpan] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._stopping = threading.Event()
        self._reported_at = 0.0
        self.counts = ExportCounts()
        self._first_backoff = first_backoff_s
        self._thread = threading.Thread(target=self._run, name="routerq-span-export", daemon=True)
        self._thread.start()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        span = bounded(span)
        with self._lock:
            if len(self._queue) >= self._max_queue:
                self._queue.popleft()
                self.counts.queue_full += 1
            self._queue.append(span)
            full = len(self._queue) >= MAX_BATCH
        if full:
            self._wake.set()

    def _take(self) -> list[ReadableSpan]:
        """The next request: up to MAX_BATCH spans and MAX_REQUEST_BYTES (at least one span)."""
        with self._lock:
            batch: list[ReadableSpan] = []
            weight = 0
            while self._queue and len(batch) < MAX_BATCH:
                weight += size_of(self._queue[0])
                if batch and weight > MAX_REQUEST_BYTES:
                    break
                batch.append(self._queue.popleft())
            self._in_flight = len(batch)
            return batch

    def _done(self) -> None:
        with self._lock:
            self._in_flight = 0
            if not self._queue:
                self._idle.notify_all()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._every_s)
            self._wake.clear()
            hold = self._hold_until() - time.time()
            if hold > 0:  # only spans wait (see telemetry.hold_export_until)
                self._stopping.wait(hold)
            while batch := self._take():
                self._send(batch)
                self._done()
            self._done()
            if self._stopping.is_set():
                return

    def _send(self, batch: Sequence[ReadableSpan]) -> None:
        if self._drop_unheard and self._not_listening():
            self.counts.refused += len(batch)
            self._say_not_listening(f"{len(batch)} span(s) not sent")
            return
        started = time.monotonic()
        delay = self._first_backoff
        while True:
            try:
                ok = self._exporter.export(batch) is SpanExportResult.SUCCESS
            except Exception:
                ok = False
            if ok:
                self.counts.sent += len(batch)
                self._said_not_listening = False  # a later outage is said again
                return
            if delay == self._first_backoff:
                self.counts.retried += len(batch)
            if self._stopping.is_set() or time.monotonic() - started + delay > self._max_retry_s:
                self.counts.refused += len(batch)
                self._report()
                return
            self._report()
            self._stopping.wait(delay)
            delay = min(MAX_BACKOFF_S, delay * 2)

    def _not_listening(self) -> bool:
        return self._listening is not None and not self._listening()

    def _say_not_listening(self, what: str) -> None:
        """Once per outage: nothing at the address is no Phoenix, not a Phoenix refusing spans."""
        if not self._said_not_listening and self._listening is not None:
            self._said_not_listening = True
            log.warning(
                "routerq: nothing listens at %s (PHOENIX_COLLECTOR_ENDPOINT): %s", self._listening.where, what
            )

    def _report(self) -> None:
        if self._not_listening():
            self._say_not_listening("spans wait here and are sent when it answers; jobs are unaffected")
            return
        now = time.monotonic()
        if now - self._reported_at < REPORT_EVERY_S:
            return
        self._reported_at = now
        counts = self.counts
        log.warning(
            "routerq: Phoenix is refusing spans; %d waiting, %d sent, %d dropped so far "
            "(%d refused, %d pushed out of a full queue); jobs are unaffected",
            len(self._queue), counts.sent, counts.dropped, counts.refused, counts.queue_full,
        )  # fmt: skip

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Wait until every queued span was sent (or given up on)."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self._lock:
            while self._queue or self._in_flight:
                self._wake.set()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.1))
        return True

    def shutdown(self) -> None:
        """Send what is queued, each batch tried once more at most: a stopping process does not wait
        out a Phoenix that is down."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(SHUTDOWN_S)
        counts = self.counts
        level = logging.WARNING if counts.dropped and not self._said_not_listening else logging.INFO
        log.log(level, "routerq: %d span(s) sent to Phoenix, %d dropped", counts.sent, counts.dropped)
        self._exporter.shutdown()
