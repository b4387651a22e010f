"""Lost-line recovery: a batch line whose queue message Redis lost is found and sent again.

Kombu's Redis transport takes a message off the queue (BRPOP) before it records it as unacked. If
Redis dies in between, or after running the BRPOP but before its reply left, the message exists
nowhere: late acks and the visibility timeout cannot bring it back. The batch record still has the
line, so workers sweep: a batch that made no progress since the last pass has its unfinished lines
looked up in the queue and in kombu's unacked hash; a line missing from both on two passes in a row
(never a message in transit between the two) is sent again. A success is final in the batch store,
so a line sent twice is at worst paid twice, never counted twice.

Keys (beside the batch's own, see routerq.batches):
  routerq:batch:{id}:sweep      hash  done count at the last pass, suspects, next scan time
  routerq:sweep-lock:{queue}    str   one pass per interval across all workers of a queue
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from celery import Celery

from producer.messages import StagedEnqueue
from routerq.batches import Batch, BatchStatus, BatchStore, as_text, active_key
from routerq.settings import Settings
from worker.app import LINE_TASK_NAME

log = logging.getLogger("routerq.recovery")

UNACKED_KEY = "unacked"  # kombu's Redis transport default
_PAGE = 1000
_MAX_BACKOFF = 20  # intervals between scans of a batch that waits behind others but lost nothing


class LostLineSweeper:
    def __init__(self, settings: Settings, app: Celery, client: redis.Redis) -> None:
        self._settings = settings
        self._app = app
        self._redis = client
        self._store = BatchStore(client, settings.result_ttl)
        self._token = uuid.uuid4().hex

    def run(self, stop: threading.Event) -> None:
        """Sweep every ROUTERQ_SWEEP_INTERVAL s until `stop`; a failed pass (Redis down) is retried."""
        while not stop.wait(self._settings.sweep_interval):
            try:
                self.sweep()
            except redis.RedisError as exc:
                log.info("routerq: lost-line sweep skipped: %s", type(exc).__name__)

    def sweep(self) -> dict[str, list[int]]:
        """One pass over the queue's active batches (if no other worker made one this interval);
        returns the lines sent again, by batch."""
        queue = self._settings.queue
        lock_ms = max(1, int(self._settings.sweep_interval * 900))
        if not self._redis.set(f"routerq:sweep-lock:{queue}", self._token, nx=True, px=lock_ms):
            return {}
        resent: dict[str, list[int]] = {}
        for raw_id in self._redis.smembers(active_key(queue)):
            batch_id = as_text(raw_id)
            lost = self._sweep_batch(batch_id)
            if lost:
                resent[batch_id] = lost
        return resent

    def _sweep_batch(self, batch_id: str) -> list[int]:
        batch = self._store.get(batch_id)
        state_key = self._store.key(batch_id, "sweep")
        if batch is None or batch.status.final:
            self._redis.srem(active_key(self._settings.queue), batch_id)
            self._redis.delete(state_key)
            return []
        if batch.status is BatchStatus.VALIDATING or batch.done + batch.parked >= batch.total:
            return []
        state = {as_text(k): as_text(v) for k, v in self._redis.hgetall(state_key).items()}
        now = time.time()
        if state.get("done") != str(batch.done):
            self._save(state_key, done=batch.done, suspects="", quiet=0, scan_at=0)
            return []
        if now < float(state.get("scan_at") or 0):
            return []
        missing = self._unaccounted(batch)
        suspects = {int(i) for i in state.get("suspects", "").split(",") if i}
        lost = sorted(missing & suspects)
        quiet = 0 if missing else int(state.get("quiet") or 0) + 1
        scan_at = now + self._settings.sweep_interval * min(2**quiet, _MAX_BACKOFF) if quiet else 0
        self._save(
            state_key, done=batch.done, suspects=",".join(map(str, sorted(missing - suspects))),
            quiet=quiet, scan_at=scan_at,
        )  # fmt: skip
        if lost:
            self._resend(batch, lost)
        return lost

    def _save(self, key: str, **fields: str | int | float) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
        pipe.expire(key, self._settings.result_ttl)
        pipe.execute()

    def _unaccounted(self, batch: Batch) -> set[int]:
        """Lines with no outcome, not parked, and no message in the queue or the unacked hash."""
        done = {int(i) for i in self._redis.hkeys(self._store.key(batch.id, "out"))}
        parked = {int(i) for i in self._redis.smembers(self._store.key(batch.id, "parked"))}
        wanted = set(range(batch.total)) - done - parked
        for index in _line_indexes(batch.id, self._messages()):
            wanted.discard(index)
            if not wanted:
                break
        return wanted

    def _messages(self) -> Iterator[Any]:
        """Raw messages on the queue, then kombu's unacked ones (delivered, not acked yet)."""
        queue = self._settings.queue
        for start in range(0, int(self._redis.llen(queue)), _PAGE):
            yield from self._redis.lrange(queue, start, start + _PAGE - 1)
        for _, value in self._redis.hscan_iter(UNACKED_KEY, count=_PAGE):
            yield value

    def _resend(self, batch: Batch, indexes: list[int]) -> None:
        staged = StagedEnqueue(
            self._app,
            self._redis,
            self._settings.queue,
            self._store.key(batch.id, "resend"),
            self._store.key(batch.id),
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


def _line_indexes(batch_id: str, raws: Iterable[Any]) -> Iterator[int]:
    """Line indexes of `batch_id` among raw kombu messages (queued envelopes or unacked entries)."""
    needle = batch_id.encode()
    for raw in raws:
        data = raw if isinstance(raw, bytes) else str(raw).encode()
        if needle not in data:
            continue
        try:
            message = json.loads(data)
            if isinstance(message, list):  # unacked: [envelope, exchange, routing key]
                message = message[0]
            args = json.loads(base64.b64decode(message["body"]))[0]
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        if len(args) >= 2 and args[0] == batch_id and isinstance(args[1], int):
            yield args[1]
