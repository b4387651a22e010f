"""`/metrics` in Prometheus's text format: the queue, the batches of the last hour, and spans."""

from __future__ import annotations

import time

import redis

from routerq.core.batch_store import BatchStatus, BatchStore
from routerq.core.export_counts import ExportCounts

RECENT_S = 3600  # batches created within this window are summed
RECENT_MAX = 1000


def metrics_text(client: redis.Redis, store: BatchStore, queue: str) -> str:
    now = time.time()
    recent = [b for b in store.recent(RECENT_MAX) if b.created_at >= now - RECENT_S]
    active = [b for b in recent if b.status in (BatchStatus.IN_PROGRESS, BatchStatus.PAUSED)]
    elapsed = [now - (b.in_progress_at or b.created_at) for b in active]
    rate = sum(b.done / e for b, e in zip(active, elapsed, strict=True) if e > 0)
    spans = ExportCounts.read(client)
    hour = "batches of the last hour"
    values: list[tuple[str, str, str, float]] = [
        ("routerq_queue_depth", "messages waiting on the queue", "gauge", int(client.llen(queue))),
        ("routerq_lines_in_flight", "batch lines running now", "gauge", sum(b.running for b in active)),
        ("routerq_lines_per_second", "lines finishing per second, active batches", "gauge", round(rate, 3)),
        ("routerq_batches_active", "batches in progress or paused", "gauge", len(active)),
        ("routerq_lines_succeeded", f"lines succeeded, {hour}", "gauge", sum(b.succeeded for b in recent)),
        ("routerq_lines_failed", f"lines failed, {hour}", "gauge", sum(b.failed for b in recent)),
        ("routerq_spend_usd", f"OpenRouter cost, {hour}", "gauge", round(sum(b.cost for b in recent), 9)),
        ("routerq_spans_sent_total", "spans workers sent to Phoenix", "counter", spans.sent),
        ("routerq_spans_dropped_total", "spans refused or dropped", "counter", spans.dropped),
    ]
    lines = []
    for name, help_text, kind, value in values:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"
