"""Worker leases: a dead worker's messages come back in seconds, not after the visibility timeout.

Kombu's Redis transport keeps every delivered, unacknowledged message in its `unacked` hash and puts it
back on the queue only once it is older than the visibility timeout (300 s by default), since it cannot
tell a running job from an orphan. Each worker process therefore keeps a lease in Redis, renewed every
LEASE_RENEW_S: the delivery tags of the messages it holds (running, waiting for a retry's countdown, or
finished with their acknowledgement not yet landed: Celery acks on a later turn of its loop, see
execution.holdings). A lease not renewed for LEASE_TTL_S is dead; every renewal tick, one worker of the
queue (a short Redis lock) puts back on the queue each unacknowledged message of that queue that is
older than GRACE_S and held by no live lease. Sidekiq's super_fetch and Temporal's heartbeat timeouts
work the same way. The visibility timeout stays as the last resort.

Keys:
  routerq:leases:{queue}           zset  worker id -> lease expiry (ms)
  routerq:lease:{queue}:{worker}   set   delivery tags the worker holds (and "alive"), expiring
  routerq:lease-sweep:{queue}      str   one orphan sweep per tick across the queue's workers
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

import redis
from celery.signals import task_received

from routerq.core.lua import lua_script
from routerq.core.redis_client import as_text
from routerq.core.settings import Settings
from routerq.worker.execution.holdings import HELD, Holdings

log = logging.getLogger("routerq.recovery")

LEASE_RENEW_S = 2.0  # how often a worker says it is alive and what it holds
LEASE_TTL_S = 10.0  # five missed renewals: a stalled but living process is not taken for dead
# A message younger than this may not be in its holder's lease yet (delivered since the last renewal).
GRACE_S = 10.0
UNACKED_KEY, UNACKED_INDEX_KEY = "unacked", "unacked_index"  # kombu's Redis transport defaults
_ALIVE = "alive"

_RESTORE = lua_script("routerq.worker.upkeep", "lease_restore")


class LeaseKeeper:
    def __init__(self, settings: Settings, client: redis.Redis, holdings: Holdings = HELD) -> None:
        self._queue = settings.queue
        self._redis = client
        self._holdings = holdings
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._registry = f"routerq:leases:{self._queue}"
        self._restore = client.register_script(_RESTORE)

    def _lease_key(self, worker_id: str) -> str:
        return f"routerq:lease:{self._queue}:{worker_id}"

    def renew(self) -> None:
        now_ms = int(time.time() * 1000)
        key = self._lease_key(self.worker_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(key)
        pipe.sadd(key, _ALIVE, *self._holdings.snapshot())
        pipe.pexpire(key, int(LEASE_TTL_S * 1000))
        pipe.zadd(self._registry, {self.worker_id: now_ms + int(LEASE_TTL_S * 1000)})
        pipe.pexpire(self._registry, int(LEASE_TTL_S * 1000) * 100)
        pipe.execute()

    def restore_orphans(self) -> list[str]:
        """Put back what no live lease holds (one worker per tick does it); returns the tags put back."""
        lock = f"routerq:lease-sweep:{self._queue}"
        if not self._redis.set(lock, self.worker_id, nx=True, px=int(LEASE_RENEW_S * 900)):
            return []
        now = time.time()
        self._redis.zremrangebyscore(self._registry, "-inf", int(now * 1000))
        live = [as_text(w) for w in self._redis.zrange(self._registry, 0, -1)]
        held: set[str] = set()
        for worker_id in live:
            held.update(as_text(t) for t in self._redis.smembers(self._lease_key(worker_id)))
        old = [as_text(t) for t in self._redis.zrangebyscore(UNACKED_INDEX_KEY, "-inf", now - GRACE_S)]
        restored = [tag for tag in old if tag not in held and self._restore_one(tag)]
        if restored:
            log.warning(
                "routerq: %d message(s) held by a worker that stopped renewing its lease put back on %s",
                len(restored), self._queue,
            )  # fmt: skip
        return restored

    def _restore_one(self, tag: str) -> bool:
        raw = self._redis.hget(UNACKED_KEY, tag)
        if raw is None:
            return False
        try:
            payload, _exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            return False
        if routing_key != self._queue:  # another queue's worker puts its own back
            return False
        payload.setdefault("headers", {})["redelivered"] = True
        payload.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
        keys = [UNACKED_KEY, UNACKED_INDEX_KEY, self._queue]
        return bool(self._restore(keys=keys, args=[tag, json.dumps(payload)]))


def track_holdings() -> None:
    """Every message Celery receives is held from then on (retries waiting for their countdown too)."""
    task_received.connect(HELD.received, weak=False)
