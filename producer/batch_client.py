"""Batches from the producer side: submit an OpenAI Batch file, follow it, cancel, retry, read results.

Enqueueing is all-or-nothing: lines are staged in a private Redis list (pipelined, thousands per round
trip) and moved onto the queue by one Lua script, so workers see every line of a batch or none.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from openinference.semconv.trace import SpanAttributes
from opentelemetry import context as otel_context
from opentelemetry.trace import Status, StatusCode

from routerq.core import telemetry
from routerq.core.batch_format import BatchLine, LineError, read_lines, validate
from routerq.core.batch_store import (
    Batch,
    BatchOrigin,
    BatchStatus,
    BatchStore,
    Fallback,
    Outcome,
    Via,
    active_key,
    new_batch_id,
)
from routerq.core.errors import BatchError, BatchFileError, StagingFailed
from routerq.core.jobs import JobKind
from routerq.core.printable import printable
from routerq.core.settings import Settings
from routerq.core.spans import BATCH_ID, chain_attributes
from routerq.core.staged_enqueue import StagedEnqueue
from routerq.core.upstream_batch import Chunker, refusal
from routerq.producer.batch_reader import BatchReader


@dataclass
class Submitted:
    batch: Batch
    existing: bool  # True when an idempotency key returned an earlier batch


class BatchClient(BatchReader):
    """Submits batches and steers them (cancel, resume, retry); reads them as a BatchReader does."""

    def __init__(
        self, settings: Settings, *, tracing: bool = True, client: redis.Redis | None = None
    ) -> None:
        super().__init__(settings, client)
        if tracing:
            telemetry.setup_tracing(settings)

    # -- submit -------------------------------------------------------------------------------------
    def submit(
        self,
        path: Path,
        *,
        name: str = "",
        metadata: dict[str, str] | None = None,
        model: str | None = None,
        session_id: str | None = None,
        user_id: str | None = None,
        idempotency_key: str | None = None,
        max_cost: float | None = None,
        origin: BatchOrigin | None = None,
        parent: otel_context.Context | None = None,
        via: Via = Via.LIVE,
        fallback: Fallback = Fallback.NONE,
        tier: str | None = None,
    ) -> Submitted:
        """Validate, store and enqueue a batch file. `parent` continues a caller's trace (the Batch API's
        `traceparent`); the submit span is otherwise a trace of its own. `via` batch sends the lines as
        OpenRouter batches (about half the price; routerq.core.upstream_batch); `fallback` live sends a
        line its upstream batch did not answer as a live call instead of another upstream batch. `tier`
        sets OpenRouter's `service_tier` (e.g. "flex") on every line that has none of its own."""
        tracer = telemetry.tracer()
        with tracer.start_as_current_span("routerq.submit", context=parent or otel_context.Context()) as span:
            span.set_attributes(chain_attributes(str(path)))
            validation = validate(path, model, max_line=self.settings.max_line_bytes)
            span.set_attribute("routerq.batch.lines", validation.lines)
            if not validation.ok:
                span.set_status(Status(StatusCode.ERROR, f"{validation.error_count} bad line(s)"))
                raise BatchFileError(validation)
            batch = Batch(
                id=new_batch_id(),
                name=printable(name),
                total=validation.lines,
                metadata=dict(metadata or {}),
                session_id=session_id,
                user_id=user_id,
                input_file=path.name,
                digest=validation.digest,
                idempotency_key=idempotency_key,
                max_cost=max_cost,
                project=telemetry.traced_project(self.settings),
                origin=origin,
                via=via,
                fallback=fallback,
            )
            if idempotency_key:
                earlier = self._claim(idempotency_key, batch)
                if earlier is not None:
                    span.set_attribute(BATCH_ID, earlier.id)
                    span.set_attribute(SpanAttributes.OUTPUT_VALUE, f"{earlier.id} (existing)")
                    return Submitted(earlier, existing=True)
            span.set_attribute(BATCH_ID, batch.id)
            span.set_attribute(SpanAttributes.SESSION_ID, session_id or batch.id)
            self.store.create(batch)
            try:
                lines = read_lines(path, model, self.settings.max_line_bytes)
                self._enqueue(batch, with_tier(lines, tier))
            except Exception as exc:
                raise self._enqueue_failed(batch, exc) from exc
            span.set_attribute(SpanAttributes.OUTPUT_VALUE, batch.id)
        return Submitted(self.get(batch.id), existing=False)

    def _claim(self, key: str, batch: Batch) -> Batch | None:
        owner = self.store.claim_idempotency_key(key, batch.id)
        if owner is None:
            return None
        earlier = self.store.get(owner)
        if earlier is None:  # expired: the key is free again
            self.store.release_idempotency_key(key)
            return self._claim(key, batch)
        if earlier.digest != batch.digest:
            raise BatchError(f"idempotency key {key!r} was used for batch {earlier.id} with a different file")
        return earlier

    def _enqueue(self, batch: Batch, lines: Iterable[BatchLine | LineError]) -> None:
        self._stage_and_release(
            batch, ((index, line) for index, line in enumerate(lines) if isinstance(line, BatchLine))
        )

    def _stage_and_release(
        self, batch: Batch, lines: Iterable[tuple[int, BatchLine | dict[str, Any]]], start: bool = True
    ) -> int:
        """Stage every line (inputs stored alongside when they are new), then release them all at once
        (`start` marks the batch in progress); returns how many lines were enqueued. A `--via batch`
        batch's lines go as upstream batches, the others as live lines."""
        staged = StagedEnqueue(self.redis, self.settings, self.store.key(batch.id))
        now = time.time()
        try:
            if batch.via is Via.BATCH:
                count = self._stage_upstream_batches(staged, batch, lines, now)
            else:
                inputs = ((i, line.stored() if isinstance(line, BatchLine) else None) for i, line in lines)
                count = staged.add_lines(batch.id, inputs, now)
            staged.flush()
        except redis.RedisError as exc:
            raise StagingFailed(f"Redis failed while staging lines of {batch.id}: {exc}") from exc
        staged.release(start=start, watch=(active_key(self.settings.queue), batch.id))
        return count

    def _stage_upstream_batches(
        self,
        staged: StagedEnqueue,
        batch: Batch,
        lines: Iterable[tuple[int, BatchLine | dict[str, Any]]],
        now: float,
    ) -> int:
        """Lines OpenRouter's batches take are grouped into upstream batches, the rest go live."""
        chunker = Chunker(self.settings.upstream_batch_max_requests, self.settings.upstream_batch_max_bytes)
        live: list[int] = []
        count = 0
        for index, line in lines:
            if isinstance(line, BatchLine):
                stored = line.stored()
                staged.add_inputs(batch.id, {str(index): stored})
                kind, body, size = line.kind, line.body, len(stored)
            else:
                kind, body, size = JobKind(line["kind"]), line["body"], len(json.dumps(line))
            count += 1
            if refusal(kind, body) is not None:
                live.append(index)
                continue
            for full in chunker.add(index, kind, body, size):
                staged.add_upstream_batch(batch.id, full, now)
        for rest in chunker.rest():
            staged.add_upstream_batch(batch.id, rest, now)
        staged.add_lines(batch.id, ((index, None) for index in live), now)
        return count

    def _enqueue_failed(self, batch: Batch, exc: Exception) -> BatchError:
        """Say exactly what happened: the release is atomic, so either every line is queued or none."""
        if isinstance(exc, StagingFailed):  # Redis failed before the release: nothing reached the queue
            return self._abandon(batch, exc.__cause__ or exc)
        try:
            status = self.store.get(batch.id)
        except Exception:
            return BatchError(
                f"Redis failed while enqueueing {batch.id} ({type(exc).__name__}); cannot tell yet whether "
                f"its {batch.total} lines were released: check `routerq status {batch.id}`"
            )
        if status is not None and status.status is BatchStatus.IN_PROGRESS:
            return BatchError(f"all {batch.total} lines of {batch.id} were enqueued, but: {exc}")
        return self._abandon(batch, exc)

    def _abandon(self, batch: Batch, exc: BaseException) -> BatchError:
        """None of the batch's lines were released: mark it failed, in one quick try (Redis may still be
        away after the retries that just ran out)."""
        said = (
            f"enqueue of {batch.id} was interrupted ({type(exc).__name__}: {exc}); "
            f"none of its {batch.total} lines were enqueued"
        )
        quick = BatchStore(redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=2), 0)
        try:
            quick.set_status(
                batch.id, BatchStatus.FAILED, reason=f"enqueue interrupted: {type(exc).__name__}"
            )
            quick.discard_staging(batch.id)
            if batch.idempotency_key:
                quick.release_idempotency_key(batch.idempotency_key)
        except redis.RedisError:
            return BatchError(
                f"{said}; Redis is still unreachable, so its record says 'validating': submit again"
            )
        return BatchError(said)

    # -- follow, control ----------------------------------------------------------------------------
    def cancel(self, batch_id: str) -> Batch:
        """Queued and parked lines are skipped by workers (never sent upstream); running ones finish."""
        batch = self.get(batch_id)
        if batch.status.final:
            return batch
        now = time.time()
        parked = self.store.unpark(batch_id, BatchStatus.CANCELLING, cancelled_at=now)
        if parked is None:
            self.store.set_status(batch_id, BatchStatus.CANCELLING, cancelled_at=now)
        elif parked:  # sent to the workers, which record each as cancelled without calling upstream
            live = batch.model_copy(update={"via": Via.LIVE})
            self._stage_and_release(live, [(index, {}) for index in parked], start=False)
        return self.get(batch_id)

    def resume(self, batch_id: str, max_cost: float | None = None) -> int:
        """Continue a paused batch once its key, credit or budget is fixed; returns the lines re-sent."""
        batch = self.get(batch_id)
        spent_budget = batch.max_cost is not None and batch.cost >= batch.max_cost
        if spent_budget and (max_cost is None or max_cost <= batch.cost):
            raise BatchError(
                f"batch {batch_id} has spent ${batch.cost:.6f} of its ${batch.max_cost:g} budget: resume it "
                f"with --max-cost above {batch.cost:.6f}"
            )
        if max_cost is not None:
            self.redis.hset(self.store.key(batch_id), "max_cost", repr(max_cost))
        parked = self.store.unpark(batch_id, BatchStatus.IN_PROGRESS)
        if parked is None:
            raise BatchError(f"batch {batch_id} is {batch.status.value}, not paused")
        lines = [(index, self.store.line(batch_id, index) or {}) for index in parked]
        return self._stage_and_release(batch, lines)

    def retry(self, batch_id: str) -> int:
        """Re-enqueue only the failed lines; returns how many."""
        batch = self.get(batch_id)
        if batch.status in (BatchStatus.CANCELLING, BatchStatus.VALIDATING):
            raise BatchError(f"batch {batch_id} is {batch.status.value}; retry it once it has ended")
        failed = sorted(self.store.indexes_with(batch_id, {Outcome.FAILED}))
        if not failed:
            return 0
        lines = [(index, self.store.line(batch_id, index) or {}) for index in failed]
        pipe = self.redis.pipeline()
        pipe.hdel(self.store.key(batch_id, "out"), *failed)
        pipe.hincrby(self.store.key(batch_id), "failed", -len(failed))
        pipe.hdel(self.store.key(batch_id), "completed_at")
        pipe.execute()
        return self._stage_and_release(batch, lines)


def with_tier(lines: Iterable[BatchLine | LineError], tier: str | None) -> Iterator[BatchLine | LineError]:
    """Lines with OpenRouter's `service_tier` set, unless a line chose its own."""
    for line in lines:
        if tier and isinstance(line, BatchLine):
            line.body.setdefault("service_tier", tier)
        yield line
