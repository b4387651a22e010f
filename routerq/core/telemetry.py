"""Tracing set-up shared by producer and worker: the Phoenix exporter, and the instrumentors a worker adds.

A process sets tracing up once, after any fork (the export thread does not survive fork), and flushes
before it exits.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

from routerq.core.export_counts import ExportCounts
from routerq.core.phoenix_otel import import_phoenix_otel
from routerq.core.settings import Settings
from routerq.core.span_export import MAX_RETRY_S, SCHEDULE_S, Listening, SpanQueue

if TYPE_CHECKING:
    from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

TRACER_NAME = "routerq"
EXPORT_RETRY_LOGGERS = ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "urllib3.connectionpool")
_provider: TracerProvider | None = None
_queue: SpanQueue | None = None
_pid: int | None = None
_hold_until = 0.0


def hold_export_until(moment: float) -> None:
    """Keep finished spans in the export queue until `moment` (epoch seconds): Phoenix prices a span
    only at ingestion, from a price table it reloads every few seconds. Jobs never wait for this."""
    global _hold_until
    _hold_until = max(_hold_until, moment)


# Seconds one span export request may take, and how long refused spans are tried again. A producer
# exits soon after its spans are made and must not hang at exit when Phoenix is down; a worker exports
# all day and rides out a Phoenix that is full or restarting.
PRODUCER_EXPORT_TIMEOUT_S = 3.0
WORKER_EXPORT_TIMEOUT_S = 10.0
WORKER_EXPORT_RETRY_S = MAX_RETRY_S
# How often a long-lived process sends its spans. Phoenix pays for every insert transaction, not only
# for every span: at C=64 beside two busy worker processes, sending every 5 s instead of every second
# took Phoenix from 0.22-0.26 to 0.14-0.19 of a core and traced throughput from 0.87-0.91 to 0.94 of
# untraced (bench.trace_budget). Spans reach Phoenix up to this much later; a producer sends its own
# at exit.
LONG_LIVED_EXPORT_EVERY_S = 5.0


def setup_tracing(
    settings: Settings,
    export_timeout: float = PRODUCER_EXPORT_TIMEOUT_S,
    retry_for: float = PRODUCER_EXPORT_TIMEOUT_S,
    wrap: Callable[[SpanQueue], SpanProcessor] | None = None,
    instrumentors: Sequence[BaseInstrumentor] = (),
    exits_soon: bool = True,
) -> TracerProvider | None:
    """Idempotent per process; a fork gets a fresh provider. Returns None when tracing is off.
    A refused span export is tried again for `retry_for` seconds. `wrap` puts a processor in front of
    the export queue (the worker's tail sampler). `instrumentors` (the worker's: Celery, openai) are
    pointed at this provider; a producer has none (it publishes without Celery and never calls openai).
    `exits_soon` (a producer): spans for a Phoenix that is not listening at all are given up at once."""
    global _provider, _pid, _queue
    if not settings.tracing:
        return None
    if _provider is not None and _pid == os.getpid():
        return _provider

    # Imported on first use, not with this module: commands that never trace (status, results,
    # tracing off) should not pay for it.
    phoenix_otel = import_phoenix_otel()

    os.environ.setdefault("PHOENIX_DISCOVER_CONFIG", "false")
    endpoint = f"{settings.phoenix_collector_endpoint}/v1/traces"
    api_key = settings.phoenix_api_key.get_secret_value() if settings.phoenix_api_key else None
    provider: TracerProvider = phoenix_otel.register(
        project_name=settings.phoenix_project_name,
        endpoint=endpoint,
        protocol="http/protobuf",
        # register's own processor is only a default: phoenix.otel's TracerProvider.add_span_processor
        # replaces it (documented), and routerq adds its queue below. batch=False: the default that is
        # replaced never starts an export thread.
        batch=False,
        api_key=api_key,
        set_global_tracer_provider=True,
        verbose=False,
        id_generator=ChosenIds(),
    )
    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    queue = SpanQueue(
        phoenix_otel.HTTPSpanExporter(endpoint=endpoint, headers=headers, timeout=export_timeout),
        max_retry_s=retry_for,
        hold_until=lambda: _hold_until,
        listening=Listening(endpoint),
        every_s=SCHEDULE_S if exits_soon else LONG_LIVED_EXPORT_EVERY_S,
        drop_unheard=exits_soon,
    )
    # The exporter and urllib3 log each failed attempt ("Transient error ...", "Retrying ..."): the
    # queue says what is wrong in one line of its own (span_export), so theirs are only noise.
    for noisy in EXPORT_RETRY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    provider.add_span_processor(wrap(queue) if wrap else queue)
    for instrumentor in instrumentors:
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
        instrumentor.instrument(tracer_provider=provider)
    _provider, _pid, _queue = provider, os.getpid(), queue
    atexit.register(flush)  # producers exit normally; prefork children flush in worker_process_shutdown
    return provider


def traced_project(settings: Settings) -> str | None:
    """The Phoenix project a job made here should be traced into, when this process traces: workers
    send its spans there too, so one trace never splits across two projects."""
    return settings.phoenix_project_name if _provider is not None and _pid == os.getpid() else None


def export_counts() -> ExportCounts:
    """What this process's spans came to so far (all zero when it does not trace)."""
    return _queue.counts if _queue is not None and _pid == os.getpid() else ExportCounts()


_chosen: ContextVar[tuple[int, int] | None] = ContextVar("routerq_chosen_ids", default=None)


class ChosenIds(RandomIdGenerator):
    """Random ids, except for a span started inside `chosen_ids`: a root span written at the end of
    its trace (a batch line's, see worker.line_trace) whose children already name it as parent."""

    def generate_trace_id(self) -> int:
        chosen = _chosen.get()
        return chosen[0] if chosen else super().generate_trace_id()

    def generate_span_id(self) -> int:
        chosen = _chosen.get()
        return chosen[1] if chosen else super().generate_span_id()


@contextmanager
def chosen_ids(trace_id: int, span_id: int) -> Iterator[None]:
    token = _chosen.set((trace_id, span_id))
    try:
        yield
    finally:
        _chosen.reset(token)


def flush(timeout_ms: int = 10_000) -> None:
    """Export what is buffered; never raises, since telemetry must not fail a job or a shutdown."""
    if _provider is None or _pid != os.getpid():
        return
    try:
        if not _provider.force_flush(timeout_ms):
            log.warning("routerq: span export did not finish within %d ms", timeout_ms)
    except Exception:
        log.warning("routerq: span flush failed", exc_info=True)


def shutdown() -> None:
    global _provider
    flush()
    if _provider is not None and _pid == os.getpid():
        _provider.shutdown()
    _provider = None


def tracer() -> trace.Tracer:
    """routerq's own spans go to routerq's provider even when the host app set another global one.
    One tracer per provider: `get_tracer` builds a new one each call, a line's root span asks for it."""
    if _provider is not None and _pid == os.getpid():
        return _tracer_of(_provider)
    return trace.get_tracer(TRACER_NAME)


@functools.cache
def _tracer_of(provider: TracerProvider) -> trace.Tracer:
    return provider.get_tracer(TRACER_NAME)
