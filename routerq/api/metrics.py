"""`/metrics` in Prometheus's text format: running totals kept as work ends (routerq.core.counters)
and a few gauges of what is under way. A scrape costs a handful of Redis reads, however many batches
there are: rates are Prometheus's to take (`rate(routerq_lines_total[5m])`)."""

from __future__ import annotations

import redis

from routerq.core.batch_store import active_key, batch_key
from routerq.core.counters import COUNTERS_KEY, OPEN_UPSTREAM_KEY, parse_counters
from routerq.core.export_counts import ExportCounts
from routerq.core.rate_state import model_rates
from routerq.core.redis_client import as_text

_RUNNING = {"in_progress", "paused"}


def metrics_text(client: redis.Redis, queue: str) -> str:
    pipe = client.pipeline(transaction=False)
    pipe.llen(queue)
    pipe.hgetall(COUNTERS_KEY)
    pipe.scard(OPEN_UPSTREAM_KEY)
    pipe.smembers(active_key(queue))
    depth, raw_counters, open_upstream, active = pipe.execute()
    pipe = client.pipeline(transaction=False)
    for batch_id in active:
        pipe.hget(batch_key(as_text(batch_id)), "status")
        pipe.scard(batch_key(as_text(batch_id), "calling"))
    replies = pipe.execute()
    statuses, calling = replies[0::2], replies[1::2]
    running = [as_text(s) in _RUNNING for s in statuses if s is not None]
    counters = parse_counters(raw_counters)
    spans = ExportCounts.read(client)
    out: list[str] = []

    def metric(name: str, help_text: str, kind: str, samples: dict[str, float]) -> None:
        out.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"))
        out.extend(f"{name}{labels} {value:g}" for labels, value in samples.items())

    def by(prefix: str, *labels: str) -> dict[str, float]:
        """Counters named prefix:a:b..., as samples labelled with a, b, ..."""
        samples = {}
        for key, value in sorted(counters.items()):
            if key.startswith(prefix + ":"):
                values = key[len(prefix) + 1 :].split(":")
                pairs = ",".join(f'{label}="{v}"' for label, v in zip(labels, values, strict=False))
                samples["{" + pairs + "}"] = value
        return samples

    metric("routerq_queue_depth", "messages waiting on the queue", "gauge", {"": depth})
    metric("routerq_lines_in_flight", "batch lines calling upstream now", "gauge", {"": sum(calling)})
    metric("routerq_batches_active", "batches in progress or paused", "gauge", {"": sum(running)})
    metric("routerq_lines_total", "batch lines recorded, by route and outcome", "counter",
           by("lines", "via", "outcome"))  # fmt: skip
    metric("routerq_jobs_total", "single jobs finished, by status", "counter", by("jobs", "status"))
    metric("routerq_embedding_texts_total", "embedding texts, by outcome", "counter", by("texts", "outcome"))
    metric("routerq_tokens_total", "tokens of every recorded answer", "counter", {
        '{kind="prompt"}': counters.get("prompt_tokens", 0.0),
        '{kind="completion"}': counters.get("completion_tokens", 0.0),
    })  # fmt: skip
    metric("routerq_spend_usd_total", "OpenRouter cost of everything recorded", "counter",
           {"": round(counters.get("cost", 0.0), 9)})  # fmt: skip
    metric("routerq_upstream_batches_open", "OpenRouter batches submitted and not ended", "gauge",
           {"": open_upstream})  # fmt: skip
    metric("routerq_upstream_batches_total", "OpenRouter batches ended, by status", "counter",
           by("upstream", "status"))  # fmt: skip
    rates = model_rates(client)
    quoted = {r.model: '{model="' + r.model.replace("\\", "\\\\").replace('"', '\\"') + '"}' for r in rates}
    metric("routerq_model_rate", "calls/s the shared limiter paces a model at (discovered)", "gauge",
           {quoted[r.model]: r.rate for r in rates if r.rate is not None})  # fmt: skip
    metric("routerq_model_noise", "share of a model's calls refused at any pace (a flaky provider)", "gauge",
           {quoted[r.model]: r.noise for r in rates if r.noise is not None})  # fmt: skip
    metric("routerq_model_calls_total", "calls started, by model", "counter",
           {quoted[r.model]: r.granted for r in rates})  # fmt: skip
    metric("routerq_model_refused_total", "calls upstream refused (429, temporary 402), by model", "counter",
           {quoted[r.model]: r.refused for r in rates})  # fmt: skip
    metric("routerq_spans_sent_total", "spans workers sent to Phoenix", "counter", {"": spans.sent})
    metric("routerq_spans_dropped_total", "spans refused or dropped", "counter", {"": spans.dropped})
    return "\n".join(out) + "\n"
