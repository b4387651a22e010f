"""Batch lines and single jobs whose queue message Redis lost are found and sent again.

Kombu's Redis transport takes a message off the queue (BRPOP) before it records it as unacked. If
Redis dies in between, or after running the BRPOP but before its reply left, the message exists
nowhere: late acks and the visibility timeout cannot bring it back. The batch record still has the
line (and a single job is kept while pending, see routerq.result_store), so workers sweep: a batch
that made no progress since the last pass has its unfinished lines looked up in the queue and in
kombu's unacked hash, and so do jobs pending for over an interval; one missing from both on two
passes in a row (never a message in transit between the two) is sent again. A success is final in
both stores, so what is sent twice is at worst paid twice, never counted twice.

Keys (beside the batch's own, see routerq.batch_store):
  routerq:batch:{id}:sweep      hash  done count at the last pass, suspects, next scan time
  routerq:jobs:sweep:{queue}    hash  suspects, next scan time, for the queue's pending jobs
  routerq:sweep-lock:{queue}    str   one pass per interval across all workers of a queue
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from itertools import chain

import redis
from celery import Celery

from routerq.core import envelope
from routerq.core.batch_store import Batch, BatchStatus, BatchStore, active_key
from routerq.core.broker import LINE_TASK_NAME, TASK_NAME
from routerq.core.job_chain import current_generation
from routerq.core.redis_client import as_text
from routerq.core.result_store import ResultStore
from routerq.core.settings import Settings
from routerq.core.staged_enqueue import StagedEnqueue

log = logging.getLogger("routerq.recovery")

UNACKED_KEY = "unacked"  # kombu's Redis transport default
_PAGE = 1000
_MAX_BACKOFF = 20  # intervals between scans of a batch that waits behind others but lost nothing


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
                kwargs={"gen": current_generation(self._redis, job.id)},  # the job's one live message
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

    def _unseen(
        self, wanted: set[str], needle: str, keys: Callable[[envelope.Message], list[str]]
    ) -> set[str]:
        """What of `wanted` has no message on the queue nor among kombu's unacked ones (delivered, not
        acked yet). The queue is read first: a message moving to unacked meanwhile is still seen.
        Only messages that contain `needle` are parsed (most of a big queue belongs to others)."""
        wanted = set(wanted)
        queue = self._settings.queue
        pages = (
            self._redis.lrange(queue, i, i + _PAGE - 1) for i in range(0, int(self._redis.llen(queue)), _PAGE)
        )
        unacked = (value for _, value in self._redis.hscan_iter(UNACKED_KEY, count=_PAGE))
        for raw in chain(chain.from_iterable(pages), unacked):
            if not wanted:
                break
            data = raw if isinstance(raw, bytes) else str(raw).encode()
            message = envelope.parse(data) if needle.encode() in data else None
            if message is not None:
                wanted.difference_update(keys(message))
        return wanted

    def _resend_lines(self, batch: Batch, indexes: list[int]) -> None:
        staged = StagedEnqueue(self._redis, self._settings, self._batches.key(batch.id), part="resend")
        staged.add_lines(batch.id, ((index, None) for index in indexes), time.time())
        staged.release(start=False)
        log.warning(
            "routerq: batch %s: %d line(s) had no outcome and no message in Redis (lost by the broker); "
            "sent again: %s",
            batch.id, len(indexes), ",".join(map(str, indexes)),
        )  # fmt: skip


def _line_of(batch_id: str) -> Callable[[envelope.Message], list[str]]:
    def indexes(message: envelope.Message) -> list[str]:
        if message.task != LINE_TASK_NAME or message.args[0] != batch_id:
            return []
        return [str(i) for i in message.args[1]]

    return indexes


def _job_id(message: envelope.Message) -> list[str]:
    return [message.id] if message.task == TASK_NAME else []
