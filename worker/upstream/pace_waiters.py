"""The lines of this worker process waiting for a model's discovered pace.

Waiting in place is cheap when the wait is short, but every waiting line is one of the lines a worker
holds (about `--concurrency`: Celery's prefetch, with a batch message lending its lines' share). In a
batch over two models, the slow model's lines pile up waiting and fill those held lines, and the
worker fetches no more of the fast model's: both then run at the slow model's pace times the batch's
mix (measured: a 100/s model at 0.56 of its limit beside a 10/s one). So a line that finds more than
IN_PLACE_S of the model's pace already waiting ahead of it leaves instead: it is re-published with a
countdown to about its turn, held by the worker as a countdown that takes none of the held lines.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from routerq.worker.upstream.limiter import SharedLimiter

# Lines that may wait in place for a model: this many seconds of its pace, enough to keep its next
# calls ready (at 1 s the 10/s model beside a 100/s one fell to 0.70 of its limit; at 2 s, 0.80-0.86)
# without letting its waiting lines take the worker's held lines.
IN_PLACE_S = 2.0


class PaceWaiters:
    def __init__(self, limiter: SharedLimiter) -> None:
        self._limiter = limiter
        self._waiting: Counter[str] = Counter()

    @contextmanager
    def waiting(self, model: str) -> Iterator[None]:
        self._waiting[model] += 1
        try:
            yield
        finally:
            self._waiting[model] -= 1

    async def turn(self, model: str) -> float:
        """0 when a line that starts waiting for `model` may wait in place; else the seconds until
        about its turn, when the lines already waiting hold more than IN_PLACE_S of the model's pace."""
        ahead = self._waiting[model]
        if ahead == 0:
            return 0.0
        rate = await self._limiter.paced_rate(model)
        if rate is None or ahead < max(1.0, rate * IN_PLACE_S):
            return 0.0
        return ahead / rate
