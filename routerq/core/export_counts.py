"""What happened to the spans routerq sent: counted by each process's span queue (routerq.span_export),
added up in Redis by the workers (worker.trace_budget), read by `routerq status` and `/metrics`.

Its own module, with no OpenTelemetry import: reading the counts is part of commands that must start fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from routerq.core.redis_client import as_text

# Workers add their counts here (worker.trace_budget); `routerq status` reads them.
COUNTS_KEY = "routerq:trace-export"
COUNT_NAMES = ("sent", "retried", "refused", "queue_full")


@dataclass
class ExportCounts:
    """What happened to the spans this process made, since it started."""

    sent: int = 0
    retried: int = 0  # refused at the first try and sent again (delivered unless counted below too)
    refused: int = 0  # delivered nowhere: the collector failed every try for MAX_RETRY_S
    queue_full: int = 0  # pushed out of a full queue before they could be sent

    @property
    def dropped(self) -> int:
        return self.refused + self.queue_full

    @classmethod
    def read(cls, client: redis.Redis) -> ExportCounts:
        """The counts of every worker since the key's TTL (ROUTERQ_RESULT_TTL) last lapsed."""
        raw = {as_text(k): int(v) for k, v in client.hgetall(COUNTS_KEY).items()}
        return cls(**{name: raw.get(name, 0) for name in COUNT_NAMES})
