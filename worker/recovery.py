"""Recovery from broker faults that late acks do not cover: lost messages and a consumer gone quiet.

1. A batch line or a single job whose queue message Redis lost is found and sent again.

Kombu's Redis transport takes a message off the queue (BRPOP) before it records it as unacked. If
Redis dies in between, or after running the BRPOP but before its reply left, the message exists
nowhere: late acks and the visibility timeout cannot bring it back. The batch record still has the
line (and a single job is kept while pending, see routerq.store), so workers sweep: a batch that
made no progress since the last pass has its unfinished lines looked up in the queue and in kombu's
unacked hash, and so do jobs pending for over an interval; one missing from both on two passes in a
row (never a message in transit between the two) is sent again. A success is final in both stores,
so what is sent twice is at worst paid twice, never counted twice.

2. Celery's consumer can reconnect to Redis and then never read its queue again (celery#8030,
#8091, #10205). A worker with free slots, messages waiting on its queue and nothing received for two
sweep intervals stops itself (warm shutdown, exit code RESTART_EXIT_CODE); `routerq worker`'s
supervisor starts a fresh one, and its unacked lines come back through the visibility timeout. And
Celery can give up on an "Unrecoverable error" while Redis is away yet exit 0, which the supervisor
would take for a requested stop: routerq turns that into CRASHED_EXIT_CODE.

Keys (beside the batch's own, see routerq.batches):
  routerq:batch:{id}:sweep      hash  done count at the last pass, suspects, next scan time
  routerq:jobs:sweep:{queue}    hash  suspects, next scan time, for the queue's pending jobs
  routerq:sweep-lock:{queue}    str   one pass per interval across all workers of a queue
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from itertools import chain
from typing import Any

import redis
from celery import Celery
from celery.signals import task_received, worker_ready, worker_shutdown
from celery.utils.log import worker_logger
from celery.worker import state as worker_state

from producer.messages import StagedEnqueue
from routerq.batches import Batch, BatchStatus, BatchStore, active_key, as_text
from routerq.settings import Settings
from routerq.store import ResultStore, connect
from worker.app import LINE_TASK_NAME, TASK_NAME

log = logging.getLogger("routerq.recovery")

UNACKED_KEY = "unacked"  # kombu's Redis transport default
_PAGE = 1000
_MAX_BACKOFF = 20  # intervals between scans of a batch that waits behind others but lost nothing


RESTART_EXIT_CODE = 75  # EX_TEMPFAIL: the watchdog stopped a quiet consumer
CRASHED_EXIT_CODE = 70  # EX_SOFTWARE: Celery gave up on an "Unrecoverable error"


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
    task_received.connect(watchdog.received, weak=False)
    worker_logger.addFilter(watchdog.note_fatal)
    worker_ready.connect(lambda **_: thread.start(), weak=False)
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


def _guarded(step: Callable[[], Any], what: str) -> Any:
    try:
        return step()
    except redis.RedisError as exc:
        log.info("routerq: %s skipped: %s", what, type(exc).__name__)
    except Exception:
        log.exception("routerq: %s failed", what)
    return None


class ConsumerWatchdog:
    def __init__(self, settings: Settings, client: redis.Redis, concurrency: int) -> None:
        self._queue = settings.queue
        self._redis = client
        self._concurrency = concurrency
        self._window = 2 * settings.sweep_interval
        self.grace = settings.job_time_limit + 30
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


class LostMessageSweeper:
    def __init__(self, settings: Settings, app: Celery, client: redis.Redis) -> None:
        self._settings = settings
        self._app = app
        self._redis = client
        self._batches = BatchStore(client, settings.result_ttl)
        self._results = ResultStore(client, settings.result_ttl, settings.queue)
        self._token = uuid.uuid4().hex

    @property
    def interval(self) -> float:
        return self._settings.sweep_interval

    def sweep(self) -> dict[str, list[str]]:
        """One pass over the queue's active batches and pending jobs (if no other worker made one
        this interval); returns what was sent again: line indexes by batch id, and job ids under "jobs"."""
        queue = self._settings.queue
        lock_ms = max(1, int(self.interval * 900))
        if not self._redis.set(f"routerq:sweep-lock:{queue}", self._token, nx=True, px=lock_ms):
            return {}
        resent: dict[str, list[str]] = {}
        for raw_id in self._redis.smembers(active_key(queue)):
            batch_id = as_text(raw_id)
            lines = self._sweep_batch(batch_id)
            if lines:
                resent[batch_id] = lines
        jobs = self._sweep_jobs()
        if jobs:
            resent["jobs"] = jobs
        return resent

    def _sweep_batch(self, batch_id: str) -> list[str]:
        batch = self._batches.get(batch_id)
        state_key = self._batches.key(batch_id, "sweep")
        if batch is None or batch.status.final:
            self._redis.srem(active_key(self._settings.queue), batch_id)
            self._redis.delete(state_key)
            return []
        if batch.status is BatchStatus.VALIDATING or batch.done + batch.parked >= batch.total:
            return []
        state = self._state(state_key)
        if state.get("done") != str(batch.done):  # progress: nothing is stuck yet
            self._save(state_key, done=batch.done, suspects="", quiet=0, scan_at=0)
            return []
        if time.time() < float(state.get("scan_at") or 0):
            return []
        done = {as_text(i) for i in self._redis.hkeys(self._batches.key(batch.id, "out"))}
        parked = {as_text(i) for i in self._redis.smembers(self._batches.key(batch.id, "parked"))}
        wanted = {str(i) for i in range(batch.total)} - done - parked
        lost = sorted(
            self._confirm(state_key, state, self._unseen(wanted, batch.id, _line_of(batch.id))), key=int
        )
        if lost:
            self._resend_lines(batch, [int(i) for i in lost])
        return lost

    def _sweep_jobs(self) -> list[str]:
        state_key = f"routerq:jobs:sweep:{self._settings.queue}"
        pending = set(self._results.pending(older_than=self.interval))
        state = self._state(state_key)
        if not pending or time.time() < float(state.get("scan_at") or 0):
            return []
        lost = sorted(self._confirm(state_key, state, self._unseen(pending, TASK_NAME, _job_id)))
        for job_id in lost:
            job = self._results.pending_job(job_id)
            if job is None:  # its input expired with ROUTERQ_RESULT_TTL: nothing left to send
                self._results.unpend(job_id)
                continue
            self._app.send_task(
                TASK_NAME, args=[job.model_dump(mode="json")], task_id=job.id, queue=self._settings.queue,
                ignore_result=True,
            )  # fmt: skip
            log.warning(
                "routerq: job %s had no result and no message in Redis (lost by the broker); sent again",
                job.id,
            )
        return lost

    def _confirm(self, state_key: str, state: dict[str, str], missing: set[str]) -> set[str]:
        """Lost = missing now and at the last scan (a message in transit is never missing twice); the
        rest become suspects. While nothing is missing, scans come less and less often."""
        suspects = {i for i in state.get("suspects", "").split(",") if i}
        quiet = 0 if missing else int(state.get("quiet") or 0) + 1
        scan_at = time.time() + self.interval * min(2**quiet, _MAX_BACKOFF) if quiet else 0
        self._save(state_key, suspects=",".join(sorted(missing - suspects)), quiet=quiet, scan_at=scan_at)
        return missing & suspects

    def _state(self, key: str) -> dict[str, str]:
        return {as_text(k): as_text(v) for k, v in self._redis.hgetall(key).items()}

    def _save(self, key: str, **fields: str | int | float) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
        pipe.expire(key, self._settings.result_ttl)
        pipe.execute()

    def _unseen(self, wanted: set[str], needle: str, key: Callable[[dict[str, Any]], str | None]) -> set[str]:
        """What of `wanted` has no message on the queue nor among kombu's unacked ones (delivered, not
        acked yet). The queue is read first: a message moving to unacked meanwhile is still seen."""
        wanted = set(wanted)
        queue = self._settings.queue
        pages = (
            self._redis.lrange(queue, i, i + _PAGE - 1) for i in range(0, int(self._redis.llen(queue)), _PAGE)
        )
        unacked = (value for _, value in self._redis.hscan_iter(UNACKED_KEY, count=_PAGE))
        for raw in chain(chain.from_iterable(pages), unacked):
            if not wanted:
                break
            found = _message_key(raw, needle.encode(), key)
            if found is not None:
                wanted.discard(found)
        return wanted

    def _resend_lines(self, batch: Batch, indexes: list[int]) -> None:
        staged = StagedEnqueue(
            self._app,
            self._redis,
            self._settings.queue,
            self._batches.key(batch.id, "resend"),
            self._batches.key(batch.id),
        )
        now = time.time()
        for index in indexes:
            staged.add(LINE_TASK_NAME, [batch.id, index, now])
        staged.release(start=False)
        log.warning(
            "routerq: batch %s: %d line(s) had no outcome and no message in Redis (lost by the broker); "
            "sent again: %s",
            batch.id, len(indexes), ",".join(map(str, indexes)),
        )  # fmt: skip


def _message_key(raw: Any, needle: bytes, key: Callable[[dict[str, Any]], str | None]) -> str | None:
    """`key` of one raw kombu message (a queued envelope or an unacked [envelope, exchange, routing
    key] entry), or None; `needle` must occur in it, which skips most messages unparsed."""
    data = raw if isinstance(raw, bytes) else str(raw).encode()
    if needle not in data:
        return None
    try:
        message = json.loads(data)
        return key(message[0] if isinstance(message, list) else message)
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _line_of(batch_id: str) -> Callable[[dict[str, Any]], str | None]:
    def index(message: dict[str, Any]) -> str | None:
        args = json.loads(base64.b64decode(message["body"]))[0]
        return str(args[1]) if args[0] == batch_id else None

    return index


def _job_id(message: dict[str, Any]) -> str | None:
    headers = message["headers"]
    return str(headers["id"]) if headers.get("task") == TASK_NAME else None
