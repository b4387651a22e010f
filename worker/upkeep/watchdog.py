"""A consumer gone quiet, and a Celery that gives up but exits 0: both turned into a restart.

Celery's consumer can reconnect to Redis and then never read its queue again (celery#8030,
#8091, #10205). A worker with free slots, messages waiting on its queue and nothing received for two
sweep intervals stops itself (warm shutdown, exit code RESTART_EXIT_CODE); `routerq worker`'s
supervisor starts a fresh one, and its unacked lines come back through the visibility timeout. And
Celery can give up on an "Unrecoverable error" while Redis is away yet exit 0, which the supervisor
would take for a requested stop: routerq turns that into CRASHED_EXIT_CODE.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import redis
from celery.worker import state as worker_state

from routerq.core.settings import Settings

log = logging.getLogger("routerq.recovery")

RESTART_EXIT_CODE = 75  # EX_TEMPFAIL: the watchdog stopped a quiet consumer
CRASHED_EXIT_CODE = 70  # EX_SOFTWARE: Celery gave up on an "Unrecoverable error"
# Beyond the job time limit, time for a warm shutdown to ack and return what it holds.
SHUTDOWN_GRACE_S = 30


class ConsumerWatchdog:
    def __init__(self, settings: Settings, client: redis.Redis, concurrency: int) -> None:
        self._queue = settings.queue
        self._redis = client
        self._concurrency = concurrency
        self._window = 2 * settings.sweep_interval
        self.grace = settings.job_time_limit + SHUTDOWN_GRACE_S
        self._last_received = time.monotonic()
        self._starving_since: float | None = None
        self._tripped = False
        self._fatal = False

    def received(self, **_: Any) -> None:
        """Connected to Celery's task_received signal (consumer side, every pool)."""
        self._last_received = time.monotonic()

    def note_fatal(self, record: logging.LogRecord) -> bool:
        """A filter on Celery's worker logger: it logs its "Unrecoverable error" at CRITICAL."""
        if record.levelno >= logging.CRITICAL:
            self._fatal = True
        return True

    def exit_code(self, celery_code: Any) -> Any:
        """Celery can end on an "Unrecoverable error" (kombu failing mid-reconnect) with code 0,
        which reads as a requested stop; routerq says it failed so the supervisor starts it again."""
        if self._tripped:
            return RESTART_EXIT_CODE
        if self._fatal and not celery_code:
            log.error(
                "routerq: the Celery worker ended on an unrecoverable error; exiting %d", CRASHED_EXIT_CODE
            )
            return CRASHED_EXIT_CODE
        return celery_code

    def stalled(self) -> bool:
        """True once messages have waited with slots free and nothing received for the window."""
        now = time.monotonic()
        free = len(worker_state.reserved_requests) < self._concurrency
        starving = free and int(self._redis.llen(self._queue)) > 0
        if not starving:
            self._starving_since = None
        elif self._starving_since is None or self._last_received > self._starving_since:
            self._starving_since = now
        return self._starving_since is not None and now - self._starving_since >= self._window

    def restart(self) -> None:
        self._tripped = True
        log.error(
            "routerq: the consumer stopped taking jobs (messages waiting on %s, slots free, none received "
            "for %.0f s): shutting down so the supervisor starts a fresh worker",
            self._queue, self._window,
        )  # fmt: skip
        os.kill(os.getpid(), signal.SIGTERM)
