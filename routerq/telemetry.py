"""Tracing set-up shared by producer and worker: Phoenix exporter plus the OpenAI and Celery instrumentors.

Prefork children must call `setup_tracing` after fork (the batch exporter's thread does not survive
fork) and `flush` before they exit (children leave with os._exit, so atexit never runs).
"""

from __future__ import annotations

import atexit
import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from routerq.settings import Settings

log = logging.getLogger(__name__)

TRACER_NAME = "routerq"
_provider: TracerProvider | None = None
_pid: int | None = None


def setup_tracing(settings: Settings) -> TracerProvider | None:
    """Idempotent per process; a fork gets a fresh provider. Returns None when tracing is off."""
    global _provider, _pid
    if not settings.tracing:
        return None
    if _provider is not None and _pid == os.getpid():
        return _provider

    from openinference.instrumentation.openai import OpenAIInstrumentor
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from phoenix.otel import register

    os.environ.setdefault("PHOENIX_DISCOVER_CONFIG", "false")
    # A 50,000-line submit makes 50,000 spans in seconds: buffer them rather than drop them (the SDK
    # drops, with a warning, what does not fit; export never blocks a job).
    os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", "131072")
    os.environ.setdefault("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2048")
    provider = register(
        project_name=settings.phoenix_project_name,
        endpoint=f"{settings.phoenix_collector_endpoint}/v1/traces",
        protocol="http/protobuf",
        batch=True,
        api_key=settings.phoenix_api_key.get_secret_value() if settings.phoenix_api_key else None,
        set_global_tracer_provider=True,
        verbose=False,
    )
    for instrumentor in (OpenAIInstrumentor(), CeleryInstrumentor()):  # type: ignore[no-untyped-call]
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
        instrumentor.instrument(tracer_provider=provider)
    _provider, _pid = provider, os.getpid()
    atexit.register(flush)  # producers exit normally; prefork children flush in worker_process_shutdown
    return provider


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
