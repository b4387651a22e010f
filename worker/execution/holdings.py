"""The delivery tags this worker process holds, for its lease (routerq.worker.upkeep.leases).

A message is held from Celery's `task_received` until its acknowledgement has reached Redis. Celery
does not acknowledge when the task's callback returns: with an event loop it schedules the ack on its
hub (`call_soon`), which runs it on a later turn, after up to a poll's timeout. A message let go of at
the callback was missing from its holder's lease for that turn while still in kombu's `unacked` hash;
a lease renewal and another worker's sweep inside that gap put a long-waiting retry back on the queue
while its holder lived (issue 21's false "dead worker" put-backs). So a finished message stays held
until kombu says it is acknowledged.
"""

from __future__ import annotations

import threading
import time
from typing import Any

# A finished message whose ack never lands (the broker connection broke) is let go of after this: its
# job has an outcome, and a copy put back then ends at the call gate without a call.
ACK_WAIT_S = 60.0


class Holdings:
    """The delivery tags this process holds: added when Celery receives a message, kept until the
    pool's acknowledgement has landed. Fed from the consumer's thread and the loop's, read by the
    lease thread."""

    def __init__(self) -> None:
        self._tags: set[str] = set()
        self._acking: dict[str, tuple[Any, float]] = {}  # tag -> (kombu message, when its task ended)
        self._lock = threading.Lock()

    def received(self, request: Any = None, **_: Any) -> None:
        """Connected to Celery's task_received signal."""
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag:
            with self._lock:
                self._tags.add(str(tag))

    def done(self, tag: str | None, message: Any = None) -> None:
        """The task of `tag` ended; its `message` (kombu's) is held until it says it is acknowledged."""
        if not tag:
            return
        with self._lock:
            self._tags.discard(tag)
            if message is not None and not message.acknowledged:
                self._acking[tag] = (message, time.monotonic())

    def snapshot(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            for tag, (message, ended) in list(self._acking.items()):
                if message.acknowledged or now - ended > ACK_WAIT_S:
                    del self._acking[tag]
            return [*self._tags, *self._acking]


HELD = Holdings()
