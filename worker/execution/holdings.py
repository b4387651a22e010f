"""The delivery tags this worker process holds, for its lease (routerq.worker.upkeep.leases)."""

from __future__ import annotations

import threading
from typing import Any


class Holdings:
    """The delivery tags this process holds: added when Celery receives a message, removed when the
    pool has acknowledged it. Fed from the consumer's thread and the loop's, read by the lease thread."""

    def __init__(self) -> None:
        self._tags: set[str] = set()
        self._lock = threading.Lock()

    def received(self, request: Any = None, **_: Any) -> None:
        """Connected to Celery's task_received signal."""
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag:
            with self._lock:
                self._tags.add(str(tag))

    def done(self, tag: str | None) -> None:
        if tag:
            with self._lock:
                self._tags.discard(tag)

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self._tags)


HELD = Holdings()
