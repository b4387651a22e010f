"""How many successful lines' traces go to Phoenix: a budget of spans per second shared by every worker.

Phoenix ingests spans one at a time (4-7 ms of its CPU each, ~150-250 spans/s per Phoenix process),
so a bulk batch traced whole floods it and it starts refusing spans at random, failures included.
Lines that matter (failed, retried, parked, rate-limited, slow) are always traced and are charged to
the budget first; what is left goes to successful lines, chosen by trace id (keep when the trace id
falls below the kept fraction, as OpenTelemetry's TraceIdRatioBased does), so the choice is
reproducible. Every second each worker process adds the spans it kept and wanted to a Redis hash for
that second and reads the previous second's totals: the fraction is the budget left after the
always-kept spans over all workers' demand, and each process also caps itself at its share with a
small token bucket, so a burst cannot overshoot by more than a second's share.

The same tick adds this process's span export counts (routerq.span_export) to a hash every worker
shares, so `routerq status` can say whether any span was refused or dropped.

Keys:
  routerq:trace-budget:{epoch second}   hash  forced / wanted spans and per-process demand, for 10 s
  routerq:trace-export                  hash  sent / refused / queue_full spans, summed over workers
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

import redis

from routerq.core.export_counts import COUNT_NAMES, COUNTS_KEY, ExportCounts
from routerq.core.redis_client import as_text

log = logging.getLogger(__name__)

KEY = "routerq:trace-budget:{second}"
KEY_TTL_S = 10
TICK_S = 1.0
# The bucket holds this many seconds of a process's share: enough for the jitter of a second's
# completions, little enough that the budget holds over any few seconds.
BURST_S = 2.0
# A line's trace is two spans (line + call), more when retried: the bucket always holds one line.
MIN_BURST_SPANS = 4.0
RATIO_BITS = 64  # the low 64 bits of a trace id are random in every W3C trace id


def ratio_keeps(trace_id: int, ratio: float) -> bool:
    """TraceIdRatioBased's rule: the same trace id and fraction always give the same answer."""
    return (trace_id & ((1 << RATIO_BITS) - 1)) < ratio * (1 << RATIO_BITS)


def fraction(budget: float, forced: float, wanted: float) -> float:
    """The fraction of successful lines' spans that fits in what the always-kept spans left."""
    if wanted <= 0:
        return 1.0
    return max(0.0, min(1.0, (budget - forced) / wanted))


class TraceBudget:
    """One per worker process. `keep` is called on the event loop; the tick runs in its own thread.
    A budget of None (ROUTERQ_TRACE_BUDGET=all) keeps everything."""

    def __init__(
        self, client: redis.Redis, budget: float | None, counts: Callable[[], ExportCounts], ttl: int
    ) -> None:
        self._redis = client
        self._unlimited = budget is None
        self._budget = budget if budget is not None else 0.0
        self._counts = counts
        self._reported = ExportCounts()
        self._ttl = ttl
        self._me = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._forced = 0  # spans since the last tick
        self._wanted = 0
        self.ratio = 1.0
        self._share = self._budget  # spans/s this process may keep, until the first tick says otherwise
        self._tokens = MIN_BURST_SPANS  # a new process learns its share before it bursts
        self._filled_at = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="routerq-trace-budget", daemon=True)
        self._thread.start()

    def always(self, spans: int) -> None:
        with self._lock:
            self._forced += spans

    def would_drop(self, trace_id: int) -> bool:
        """What `keep` will most likely say of a successful line, asked before its call."""
        return not self._unlimited and not ratio_keeps(trace_id, self.ratio)

    def keep(self, trace_id: int, spans: int) -> bool:
        """Whether a successful line's `spans` fit in the budget."""
        if self._unlimited:
            return True
        with self._lock:
            self._wanted += spans
            self._refill()
            if not ratio_keeps(trace_id, self.ratio) or self._tokens < spans:
                return False
            self._tokens -= spans
            return True

    def _refill(self) -> None:
        now = time.monotonic()
        capacity = max(self._share * BURST_S, MIN_BURST_SPANS)
        self._tokens = min(capacity, self._tokens + (now - self._filled_at) * self._share)
        self._filled_at = now

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except redis.RedisError as exc:  # keep the last fraction; the sampler works without Redis
                log.debug("trace budget: %s", exc)

    def tick(self) -> None:
        with self._lock:
            forced, wanted = self._forced, self._wanted
            self._forced = self._wanted = 0
        second = int(time.time())
        pipe = self._redis.pipeline(transaction=False)
        key = KEY.format(second=second)
        pipe.hincrby(key, "forced", forced)
        pipe.hincrby(key, "wanted", wanted)
        pipe.hincrby(key, f"p:{self._me}", wanted)
        pipe.expire(key, KEY_TTL_S)
        counts = replace(self._counts())  # a snapshot: the live counts keep moving
        for name in COUNT_NAMES:
            delta = getattr(counts, name) - getattr(self._reported, name)
            if delta:
                pipe.hincrby(COUNTS_KEY, name, delta)
        pipe.expire(COUNTS_KEY, self._ttl)
        pipe.hgetall(KEY.format(second=second - 1))
        last = {as_text(k): float(v) for k, v in pipe.execute()[-1].items()}
        self._reported = counts
        total_forced, total_wanted = last.get("forced", 0.0), last.get("wanted", 0.0)
        mine = last.get(f"p:{self._me}", 0.0)
        processes = sum(1 for k in last if k.startswith("p:")) or 1
        left = max(0.0, self._budget - total_forced)
        with self._lock:
            self.ratio = fraction(self._budget, total_forced, total_wanted)
            self._share = left * mine / total_wanted if total_wanted > 0 else left / processes

    def stop(self) -> None:
        self._stop.set()
