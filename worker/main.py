"""Starting a worker: the Celery app plus tracing wired around fork, flush and log redaction."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from typing import Any

from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from routerq import telemetry
from routerq.redaction import RedactingFilter
from routerq.settings import Settings
from worker.app import create_app
from worker.preflight import check_api_key

POOLS = ("prefork", "threads", "solo", "gevent", "eventlet")
SUPERVISED_ENV = "ROUTERQ_SUPERVISED"


def run_worker(settings: Settings, concurrency: int, pool: str, loglevel: str = "INFO") -> None:
    """Blocks until the worker stops. Prefork children set up tracing after fork, others up front."""
    check_api_key(settings)
    app = create_app(settings)

    def redact_logs(logger: logging.Logger, **_: Any) -> None:
        log_filter = RedactingFilter(settings.secrets)
        for handler in logger.handlers:
            handler.addFilter(log_filter)

    after_setup_logger.connect(redact_logs, weak=False)
    after_setup_task_logger.connect(redact_logs, weak=False)
    if pool == "prefork":
        worker_process_init.connect(lambda **_: telemetry.setup_tracing(settings), weak=False)
        worker_process_shutdown.connect(lambda **_: telemetry.flush(), weak=False)
    else:
        telemetry.setup_tracing(settings)
    worker_shutdown.connect(lambda **_: telemetry.shutdown(), weak=False)
    app.worker_main(
        [
            "worker",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
            f"--queues={settings.queue}",
            f"--loglevel={loglevel}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def supervise(argv: list[str], max_backoff: float = 30.0) -> int:
    """Run the worker in a child process and start it again whenever it dies on its own.

    Celery's consumer can die on a broker connection loss (an `Unrecoverable error` seen here when
    Redis is killed mid-ack); unacked jobs are safe in Redis, but someone must start a worker again.
    SIGTERM/SIGINT are passed on and end the loop: the child shuts down warmly.
    """
    log = logging.getLogger("routerq.supervisor")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/supervisor] %(message)s")
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    backoff = 1.0
    while True:
        started = time.monotonic()
        child = subprocess.Popen(argv, env={**os.environ, SUPERVISED_ENV: "1"})
        code = child.wait()
        if stopping or code == 0:
            return code
        if time.monotonic() - started > 60:
            backoff = 1.0
        log.warning("worker exited unexpectedly (code %s); starting it again in %.0f s", code, backoff)
        time.sleep(backoff)
        backoff = min(backoff * 2, max_backoff)
