"""The worker's maintenance threads: every ROUTERQ_SWEEP_INTERVAL s a lost-message sweep, then a look
at the consumer; every LEASE_RENEW_S the worker's lease, then a look for orphaned messages. Started
once the worker is ready; the lease thread lives as long as the process (a warm shutdown still holds
messages until its running tasks end)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from celery.signals import task_received, worker_ready, worker_shutdown
from celery.utils.log import worker_logger

from routerq.core.redis_client import connect
from routerq.core.settings import Settings
from routerq.worker.upkeep.leases import LEASE_RENEW_S, LeaseKeeper, track_holdings
from routerq.worker.upkeep.sweeper import LostMessageSweeper
from routerq.worker.upkeep.watchdog import RESTART_EXIT_CODE, ConsumerWatchdog

log = logging.getLogger("routerq.recovery")


def watch_broker(app: Celery, settings: Settings, concurrency: int) -> ConsumerWatchdog:
    """Wire the sweep and the watchdog into a worker about to start; they run once it is ready."""
    client = connect(settings.redis_url)
    stop = threading.Event()
    watchdog = ConsumerWatchdog(settings, client, concurrency)
    thread = threading.Thread(
        target=maintain,
        args=(LostMessageSweeper(settings, app, client), watchdog, stop),
        name="routerq-maintain",
        daemon=True,
    )
    leases = threading.Thread(
        target=keep_leases, args=(LeaseKeeper(settings, client),), name="routerq-leases", daemon=True
    )
    track_holdings()
    task_received.connect(watchdog.received, weak=False)
    worker_logger.addFilter(watchdog.note_fatal)
    worker_ready.connect(lambda **_: thread.start(), weak=False)
    worker_ready.connect(lambda **_: leases.start(), weak=False)
    worker_shutdown.connect(lambda **_: stop.set(), weak=False)
    return watchdog


def maintain(sweeper: LostMessageSweeper, watchdog: ConsumerWatchdog, stop: threading.Event) -> None:
    """Every ROUTERQ_SWEEP_INTERVAL s until `stop`: a sweep, then a look at the consumer. A step that
    fails (Redis down, or a bug) is logged and tried again next time; neither stops the other."""
    while not stop.wait(sweeper.interval):
        _guarded(sweeper.sweep, "lost-message sweep")
        if _guarded(watchdog.stalled, "consumer check"):
            watchdog.restart()
            if not stop.wait(watchdog.grace):  # the warm shutdown hangs too: leave anyway
                os._exit(RESTART_EXIT_CODE)
            return


def keep_leases(keeper: LeaseKeeper) -> None:
    """Renew, then look for orphans, every LEASE_RENEW_S; a late renewal only delays recovery."""
    while True:
        _guarded(keeper.renew, "lease renewal")
        _guarded(keeper.restore_orphans, "orphan sweep")
        time.sleep(LEASE_RENEW_S)


def _guarded(step: Callable[[], Any], what: str) -> Any:
    try:
        return step()
    except redis.RedisError as exc:
        log.info("routerq: %s skipped: %s", what, type(exc).__name__)
    except Exception:
        log.exception("routerq: %s failed", what)
    return None
