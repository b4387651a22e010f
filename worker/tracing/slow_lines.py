"""Which lines are slow for their batch: over a fixed threshold, or over the batch's p99.

The p99 is the whole batch's, from the latency histogram every worker adds to in Redis when it records
a line (routerq.batch_store), read again every few seconds per batch. A p99 each process kept of its
own lines lagged behind latencies that drift under load, and flagged ~3 % of a 100,000-line batch's
lines as slow instead of 1 %: each one a trace sent past the budget.

Latencies that rise during a batch (a machine getting busier, Phoenix among the busy) put far more
than 1 % of the new lines over the p99 of the lines so far, and each kept trace made Phoenix busier
still (10 % of a 5,000-line batch kept at C=64 with Phoenix on the same cores). So each process keeps
at most SLOW_SHARE of its own lines of a batch for being over the p99, as the p99 means; a line far
over it (FAR_OVER times) is kept whatever the count: that one is slow, not the load.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

REFRESH_S = 5.0  # how stale a batch's p99 may be
REFRESH_UNKNOWN_S = 0.5  # how soon to ask again while a batch has too few lines for a p99
MIN_SAMPLES = 100  # below this a p99 is about the maximum, and every new maximum would count as slow
MAX_BATCHES = 64  # batches remembered per process; the least recently seen is forgotten first
SLOW_SHARE = 0.01  # at most this share of a process's lines of a batch is kept for being over the p99
SLOW_SLACK = 5  # ...plus a few, so the first slow lines of a batch are kept too
FAR_OVER = 2.0

# A batch's recorded line count and p99 latency in ms (None before any line was recorded).
Fetch = Callable[[str], Awaitable[tuple[int, float | None]]]


@dataclass
class _Known:
    at: float
    p99_ms: float | None
    lines: int = 0  # this process's lines of the batch so far
    slow: int = 0  # of them, kept for being over the p99


class SlowLines:
    def __init__(self, threshold_s: float, fetch: Fetch) -> None:
        self._threshold = threshold_s
        self._fetch = fetch
        self._batches: OrderedDict[str, _Known] = OrderedDict()

    async def is_slow(self, batch_id: str, latency_s: float) -> bool:
        if latency_s >= self._threshold:
            return True
        known = self._batches.pop(batch_id, None)
        now = time.monotonic()
        if known is None or now - known.at > (REFRESH_S if known.p99_ms is not None else REFRESH_UNKNOWN_S):
            # one refresh at a time, not one a line
            known = _Known(now, *(known.p99_ms, known.lines, known.slow) if known else (None,))
            self._remember(batch_id, known)
            lines, p99_ms = await self._fetch(batch_id)
            known.p99_ms = p99_ms if lines >= MIN_SAMPLES else None
        else:
            self._remember(batch_id, known)
        known.lines += 1
        if known.p99_ms is None or latency_s * 1000 <= known.p99_ms:
            return False
        if latency_s * 1000 > FAR_OVER * known.p99_ms or known.slow < SLOW_SHARE * known.lines + SLOW_SLACK:
            known.slow += 1
            return True
        return False

    def _remember(self, batch_id: str, known: _Known) -> None:
        self._batches[batch_id] = known
        if len(self._batches) > MAX_BATCHES:
            self._batches.popitem(last=False)
