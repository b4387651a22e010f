"""Running one worker process: the Celery app plus tracing wired around fork, flush and log redaction."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_shutdown,
)
from openinference.instrumentation.openai import OpenAIInstrumentor

from routerq.core import telemetry
from routerq.core.broker import LINES_PER_MESSAGE
from routerq.core.redaction import redact_handlers
from routerq.core.settings import Settings
from routerq.worker.execution.app import create_worker_app
from routerq.worker.tracing.celery_tracing import CeleryInstrumentor
from routerq.worker.tracing.tail_sampler import installer
from routerq.worker.upkeep.maintenance import watch_broker
from routerq.worker.upkeep.supervisor import WORKER_INDEX_ENV
from routerq.worker.upstream.preflight import check_api_key

# One record per line each (received, succeeded, HTTP request): at hundreds of lines a second that is
# a good part of a worker's CPU. `routerq status` counts lines; failures and retries still log.
PER_LINE_LOGGERS = ("celery.app.trace", "celery.worker.strategy", "httpx", "httpx2")


def run_worker(settings: Settings, concurrency: int, loglevel: str = "INFO") -> None:
    """Blocks until the worker stops. One process, one event loop (worker.pool): no fork, so tracing
    is set up here, before Celery starts."""
    check_api_key(settings)
    app = create_worker_app(settings)
    app.conf.routerq_slots = concurrency  # upstream calls in flight, and the connection pool's size
    # Messages the consumer may hold (prefetch): the slots plus one message of lines in reserve, so a
    # message whose last lines are still running never leaves slots idle (worker.pool counts a
    # message of n lines as n).
    prefetch = concurrency + LINES_PER_MESSAGE

    def redact_logs(logger: logging.Logger, **_: Any) -> None:
        redact_handlers(settings.secrets, [logger])
        if loglevel.upper() != "DEBUG":
            for name in PER_LINE_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)

    after_setup_logger.connect(redact_logs, weak=False)
    after_setup_task_logger.connect(redact_logs, weak=False)
    telemetry.setup_tracing(
        settings,
        telemetry.WORKER_EXPORT_TIMEOUT_S,
        telemetry.WORKER_EXPORT_RETRY_S,
        wrap=installer(settings),
        instrumentors=[CeleryInstrumentor(), OpenAIInstrumentor()],  # type: ignore[no-untyped-call]
        exits_soon=False,
    )
    worker_shutdown.connect(lambda **_: telemetry.shutdown(), weak=False)
    watchdog = watch_broker(app, settings, prefetch)
    code: Any = 0
    try:
        app.worker_main(
            [
                "worker",
                f"--concurrency={prefetch}",
                f"--queues={settings.queue}",
                f"--loglevel={loglevel}",
                "--without-gossip",
                "--without-mingle",
                f"--hostname=routerq{os.environ.get(WORKER_INDEX_ENV, '')}@%h",
            ]
        )
    except SystemExit as exc:
        code = exc.code
    code = watchdog.exit_code(code)
    if code:
        raise SystemExit(code)
