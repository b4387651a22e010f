"""Running totals for `/metrics`, kept in one Redis hash as work ends, so a scrape is a few reads
however many batches there are.

Keys:
  routerq:counters        hash  lines:{via}:{outcome}  batch lines recorded (succeeded, failed, cancelled)
                                jobs:{status}          single jobs finished (succeeded, failed)
                                texts:{embedded,failed} embedding texts
                                upstream:{status}      OpenRouter batches ended, by their last status
                                prompt_tokens, completion_tokens, cost: of every recorded answer
  routerq:upstream:open   set   OpenRouter batches submitted and not ended (their chunk keys)
The scripts that store an outcome count it in the same step, and only when they store it: a
redelivered outcome is never counted twice. The totals never expire (Prometheus takes rates).
"""

from __future__ import annotations

from typing import Any

COUNTERS_KEY = "routerq:counters"
OPEN_UPSTREAM_KEY = "routerq:upstream:open"


def parse_counters(raw: dict[Any, Any]) -> dict[str, float]:
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): float(v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
