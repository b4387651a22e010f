"""Which lines are slow for their batch: over a fixed threshold, or over the batch's running p99.

Each worker process keeps the latest call latencies of the batches it runs (the p99 is this process's
view of the batch, which with lines spread evenly over processes is the batch's own).
"""

from __future__ import annotations

from collections import OrderedDict, deque

WINDOW = 1_000  # latencies kept per batch: enough for a stable p99
MIN_SAMPLES = 100  # below this a p99 is the maximum, and every new maximum would count as slow
RECOMPUTE_EVERY = 50
MAX_BATCHES = 64  # batches remembered per process; the least recently seen is forgotten first


class _Window:
    def __init__(self) -> None:
        self.latencies: deque[float] = deque(maxlen=WINDOW)
        self.p99 = float("inf")
        self.fresh = 0


class SlowLines:
    def __init__(self, threshold_s: float) -> None:
        self._threshold = threshold_s
        self._batches: OrderedDict[str, _Window] = OrderedDict()

    def is_slow(self, batch_id: str, latency_s: float) -> bool:
        """Records the latency, then says whether it is over the threshold or the batch's p99."""
        window = self._batches.pop(batch_id, None) or _Window()
        self._batches[batch_id] = window
        if len(self._batches) > MAX_BATCHES:
            self._batches.popitem(last=False)
        slow = latency_s >= self._threshold or latency_s > window.p99
        window.latencies.append(latency_s)
        window.fresh += 1
        if len(window.latencies) >= MIN_SAMPLES and window.fresh >= RECOMPUTE_EVERY:
            ordered = sorted(window.latencies)
            window.p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            window.fresh = 0
        return slow
