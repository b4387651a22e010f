"""Reading batches: status, progress, results. What `routerq status`, `batches` and `results` need,
and nothing more: no Celery, no OpenTelemetry SDK, so those commands start fast (producer.batch_client
adds submitting and steering on top)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import redis

from routerq.core.batch_store import Batch, BatchStats, BatchStatus, BatchStore, Outcome
from routerq.core.errors import BatchError
from routerq.core.export_counts import ExportCounts
from routerq.core.rate_state import ModelRate, model_rates
from routerq.core.redis_client import connect
from routerq.core.settings import Settings
from routerq.core.upstream_batch import batch_owner, upstream_batches


@dataclass
class ResultsWritten:
    written: int
    errors: int
    unfinished: int


class BatchReader:
    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        """`client`: a Redis client of the caller's (`routerq serve` gives one that fails fast)."""
        self.settings = settings
        self.redis = client or connect(settings.redis_url)
        self.store = BatchStore(self.redis, settings.result_ttl)

    def get(self, batch_id: str) -> Batch:
        batch = self.store.get(batch_id)
        if batch is None:
            raise BatchError(f"no batch {batch_id!r} (wrong id, or older than ROUTERQ_RESULT_TTL)")
        return batch

    def model_rates(self) -> list[ModelRate]:
        """Each model's discovered rate and refused calls, as the shared limiter keeps them."""
        return model_rates(self.redis)

    def upstream_batches(self, batch_id: str) -> dict[str, int]:
        """A `--via batch` batch's OpenRouter batches, counted by their last known status."""
        return upstream_batches(self.redis, batch_owner(batch_id))

    def stats(self, batch_id: str) -> BatchStats:
        """Latency and queue-wait percentiles of the lines run so far."""
        return self.store.stats(batch_id)

    def span_export(self) -> ExportCounts:
        """Spans every worker sent to Phoenix, and any it refused or that were dropped."""
        return ExportCounts.read(self.redis)

    def wait(self, batch_id: str, on_update: Callable[[Batch], None], poll: float = 0.5) -> Batch:
        """Until the batch ends or pauses (a paused batch waits for `resume`, not for time)."""
        while True:
            batch = self.get(batch_id)
            on_update(batch)
            if batch.status.final or batch.status is BatchStatus.PAUSED:
                return batch
            time.sleep(poll)

    def write_results(self, batch: Batch, out: IO[bytes], errors: IO[bytes] | None = None) -> ResultsWritten:
        """Output lines in input order, streamed page by page; unfinished lines are counted, not written."""
        written = failed = unfinished = 0
        for _, outcome, raw in self.store.outputs(batch.id, batch.total):
            if outcome is None:
                unfinished += 1
            elif outcome is Outcome.SUCCEEDED:
                out.write(raw + b"\n")
                written += 1
            else:
                (errors or out).write(raw + b"\n")
                failed += 1
        return ResultsWritten(written, failed, unfinished)

    def recent(self, limit: int = 50) -> Iterator[Batch]:
        yield from self.store.recent(limit)
