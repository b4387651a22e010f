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
from worker.recovery import watch_broker

POOLS = ("prefork", "threads", "solo", "gevent", "eventlet")
# One record per line each (received, succeeded, HTTP request): at hundreds of lines a second that is
# a good part of a worker's CPU. `routerq status` counts lines; failures and retries still log.
PER_LINE_LOGGERS = ("celery.app.trace", "celery.worker.strategy", "httpx", "httpx2")
SUPERVISED_ENV = "ROUTERQ_SUPERVISED"
WORKER_INDEX_ENV = "ROUTERQ_WORKER_INDEX"


def run_worker(settings: Settings, concurrency: int, pool: str, loglevel: str = "INFO") -> None:
    """Blocks until the worker stops. Prefork children set up tracing after fork, others up front."""
    check_api_key(settings)
    app = create_app(settings)

    def redact_logs(logger: logging.Logger, **_: Any) -> None:
        log_filter = RedactingFilter(settings.secrets)
        for handler in logger.handlers:
            handler.addFilter(log_filter)
        if loglevel.upper() != "DEBUG":
            for name in PER_LINE_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)

    after_setup_logger.connect(redact_logs, weak=False)
    after_setup_task_logger.connect(redact_logs, weak=False)
    if pool == "prefork":
        worker_process_init.connect(lambda **_: telemetry.setup_tracing(settings), weak=False)
        worker_process_shutdown.connect(lambda **_: telemetry.flush(), weak=False)
    else:
        telemetry.setup_tracing(settings)
    worker_shutdown.connect(lambda **_: telemetry.shutdown(), weak=False)
    watchdog = watch_broker(app, settings, concurrency)
    code: Any = 0
    try:
        app.worker_main(
            [
                "worker",
                f"--concurrency={concurrency}",
                f"--pool={pool}",
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


def default_processes(concurrency: int, pool: str) -> int:
    """Threads share one GIL per process: past ~16 calls in flight a process spends more time queueing
    for it than calling (bench/RESULTS.md), so the threads pool spreads over up to 2 per core."""
    if pool != "threads":
        return 1
    return max(1, min(concurrency // 16, 2 * (os.cpu_count() or 1)))


def split(concurrency: int, processes: int) -> list[int]:
    """Calls in flight per process, adding up to `concurrency`."""
    base, extra = divmod(concurrency, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


def supervise(argvs: list[list[str]], max_backoff: float = 30.0) -> int:
    """Run one worker process per argv and start each again whenever it dies on its own.

    Celery's consumer can die on a broker connection loss (an `Unrecoverable error` seen here when
    Redis is killed mid-ack); unacked jobs are safe in Redis, but someone must start a worker again.
    SIGTERM/SIGINT are passed on to every process and end the loop: each shuts down warmly.
    """
    log = logging.getLogger("routerq.supervisor")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/supervisor] %(message)s")
    stopping = False
    children: list[subprocess.Popen[bytes] | None] = [None] * len(argvs)
    started = [0.0] * len(argvs)
    backoff = [1.0] * len(argvs)
    due = [0.0] * len(argvs)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child is not None and child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    codes: list[int | None] = [None] * len(argvs)
    while True:
        for i, argv in enumerate(argvs):
            child = children[i]
            if child is None:
                if stopping or codes[i] == 0 or time.monotonic() < due[i]:
                    continue
                started[i] = time.monotonic()
                env = {**os.environ, SUPERVISED_ENV: "1", WORKER_INDEX_ENV: str(i)}
                children[i] = subprocess.Popen(argv, env=env)
                codes[i] = None
                continue
            code = child.poll()
            if code is None:
                continue
            children[i], codes[i] = None, code
            if stopping or code == 0:
                continue
            if time.monotonic() - started[i] > 60:
                backoff[i] = 1.0
            log.warning(
                "worker process %d exited unexpectedly (code %s); starting it again in %.0f s",
                i, code, backoff[i],
            )  # fmt: skip
            due[i] = time.monotonic() + backoff[i]
            backoff[i] = min(backoff[i] * 2, max_backoff)
        if (stopping or all(c == 0 for c in codes)) and all(c is None for c in children):
            return max((c or 0) for c in codes)
        time.sleep(0.2)
