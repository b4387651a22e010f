"""Tracing set-up shared by producer and worker: Phoenix exporter plus the OpenAI and Celery instrumentors.

Prefork children must call `setup_tracing` after fork (the batch exporter's thread does not survive
fork) and `flush` before they exit (children leave with os._exit, so atexit never runs).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from routerq.settings import Settings

log = logging.getLogger(__name__)

TRACER_NAME = "routerq"
_provider: TracerProvider | None = None
_pid: int | None = None
_hold_until = 0.0


def hold_export_until(moment: float) -> None:
    """Keep finished spans in the export queue until `moment` (epoch seconds): Phoenix prices a span
    only at ingestion, from a price table it reloads every few seconds. Jobs never wait for this."""
    global _hold_until
    _hold_until = max(_hold_until, moment)


# Seconds one span export may take, retries included. A producer exits soon after its spans are made
# and must not hang at exit when Phoenix is down; a worker exports all day and can keep retrying.
PRODUCER_EXPORT_TIMEOUT_S = 3.0
WORKER_EXPORT_TIMEOUT_S = 10.0


def setup_tracing(
    settings: Settings, export_timeout: float = PRODUCER_EXPORT_TIMEOUT_S
) -> TracerProvider | None:
    """Idempotent per process; a fork gets a fresh provider. Returns None when tracing is off."""
    global _provider, _pid
    if not settings.tracing:
        return None
    if _provider is not None and _pid == os.getpid():
        return _provider

    # Imported on first use, not with this module: together they cost about a second, and commands
    # that never trace (status, results, tracing off) should not pay it.
    from openinference.instrumentation.openai import OpenAIInstrumentor
    from phoenix.otel import BatchSpanProcessor, HTTPSpanExporter, register

    from routerq.celery_tracing import CeleryInstrumentor

    os.environ.setdefault("PHOENIX_DISCOVER_CONFIG", "false")
    # A 50,000-line submit makes 50,000 spans in seconds: buffer them rather than drop them (the SDK
    # drops, with a warning, what does not fit; export never blocks a job).
    os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", "131072")
    os.environ.setdefault("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2048")
    endpoint = f"{settings.phoenix_collector_endpoint}/v1/traces"
    api_key = settings.phoenix_api_key.get_secret_value() if settings.phoenix_api_key else None
    provider = register(
        project_name=settings.phoenix_project_name,
        endpoint=endpoint,
        protocol="http/protobuf",
        batch=True,
        api_key=api_key,
        set_global_tracer_provider=True,
        verbose=False,
    )
    # Same batching exporter, with the spans it could not deliver counted and reported.
    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    exporter = CountingExporter(HTTPSpanExporter(endpoint=endpoint, headers=headers, timeout=export_timeout))
    provider.add_span_processor(BatchSpanProcessor(span_exporter=exporter))  # replaces the default one
    for instrumentor in (OpenAIInstrumentor(), CeleryInstrumentor()):  # type: ignore[no-untyped-call]
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
        instrumentor.instrument(tracer_provider=provider)
    _provider, _pid = provider, os.getpid()
    atexit.register(flush)  # producers exit normally; prefork children flush in worker_process_shutdown
    return provider


class CountingExporter(SpanExporter):
    """Counts and logs spans that could not be exported (Phoenix down or overloaded): a dropped span
    is never silent, and a job never waits for one."""

    def __init__(self, inner: SpanExporter, report_every: float = 30.0) -> None:
        self._inner = inner
        self._report_every = report_every
        self._reported_at = 0.0
        self.exported = 0
        self.dropped = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        hold = _hold_until - time.time()
        if hold > 0:  # this runs in the processor's export thread: only spans wait
            time.sleep(hold)
        try:
            result = self._inner.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.dropped += len(spans)
            now = time.monotonic()
            if now - self._reported_at > self._report_every:
                self._reported_at = now
                log.warning(
                    "routerq: %d span(s) could not be sent to Phoenix so far (%d sent); jobs are unaffected",
                    self.dropped,
                    self.exported,
                )
        return result

    def shutdown(self) -> None:
        level = logging.WARNING if self.dropped else logging.INFO
        log.log(level, "routerq: %d span(s) sent to Phoenix, %d dropped", self.exported, self.dropped)
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


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
    """routerq's own spans go to routerq's provider even when the host app set another global one."""
    if _provider is not None and _pid == os.getpid():
        return _provider.get_tracer(TRACER_NAME)
    return trace.get_tracer(TRACER_NAME)
