"""Batch state in Redis: the batch record, its input lines, per-line outcomes, all with one TTL.

Keys (`{id}` is the batch id):
  routerq:batch:{id}        hash   the record: status, counts, usage, metadata
  routerq:batch:{id}:in     hash   line index -> input line (what workers run, what `retry` re-sends)
  routerq:batch:{id}:out    hash   line index -> outcome: one letter (S, F, C) + the OpenAI output line
  routerq:batch:{id}:run    set    line indexes running now
  routerq:batch:{id}:parked set    line indexes set aside while the batch is paused (re-sent by resume)
  routerq:batch:{id}:held   hash   line index -> the cost reserved for its call (batches with a budget)
  routerq:batch:{id}:stats  hash   latency and queue-wait histograms (routerq.histogram):
                                   lat:{bucket} and wait:{bucket} -> lines
  routerq:batches           zset   batch ids by creation time
  routerq:active:{queue}    set    batches with lines on that queue, until the lost-line sweep sees them end
A success is final: a redelivered line never overwrites or double-counts it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, TypeVar

import redis
import redis.asyncio as aredis
from pydantic import BaseModel, Field

from routerq.core.counters import COUNTERS_KEY
from routerq.core.histogram import bucket, percentiles
from routerq.core.jobs import BUILT_ON_FIRST_USE, JobResult
from routerq.core.lua import lua_script
from routerq.core.redis_client import as_text

INDEX_KEY = "routerq:batches"
DELIVERY_KEY_TTL_S = 24 * 3600  # far beyond any visibility timeout: a counter outlives its redeliveries
IDEMPOTENCY_KEY = "routerq:idempotency:{key}"


def batch_key(batch_id: str, part: str = "") -> str:
    return f"routerq:batch:{batch_id}" + (f":{part}" if part else "")


def active_key(queue: str) -> str:
    return f"routerq:active:{queue}"


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED)


class Via(StrEnum):
    """How a batch's lines reach OpenRouter (routerq.core.upstream_batch)."""

    LIVE = "live"  # each line is a live call, at the live price
    BATCH = "batch"  # lines go as OpenRouter batches, at about half the price, within 24 h


class Fallback(StrEnum):
    """Where a `--via batch` line goes when OpenRouter's batch did not answer it."""

    NONE = "none"  # into a follow-up upstream batch (batch price, minutes to hours more)
    LIVE = "live"  # a live call at once (live price, seconds)


class Outcome(StrEnum):
    SUCCEEDED = "S"
    FAILED = "F"
    CANCELLED = "C"


class BatchOrigin(BaseModel):
    """Where a batch made through the Batch API (`routerq serve`) came from; None for `routerq submit`."""

    model_config = BUILT_ON_FIRST_USE

    owner: str  # the hash of the token that made it (api.auth): only that token sees the batch
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"


class Batch(BaseModel):
    model_config = BUILT_ON_FIRST_USE
    id: str
    name: str = ""
    status: BatchStatus = BatchStatus.VALIDATING
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    running: int = 0  # lines calling upstream now
    held: int = 0  # lines a worker has taken, waiting in its messages for a call slot
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    cost_after_cancel: float = 0.0  # billed by upstream batches that ended after a cancel: in `cost`
    metadata: dict[str, str] = Field(default_factory=dict)
    session_id: str | None = None
    user_id: str | None = None
    input_file: str = ""
    digest: str = ""
    idempotency_key: str | None = None
    reason: str | None = None
    max_cost: float | None = None
    project: str | None = None  # the submitter's Phoenix project: every line's trace goes there
    origin: BatchOrigin | None = None
    via: Via = Via.LIVE
    fallback: Fallback = Fallback.NONE
    parked: int = 0
    retries: int = 0  # attempts beyond each line's first, and waits for rate limits
    traced: int = 0  # lines whose whole trace went to Phoenix
    sampled_out: int = 0  # successful lines the trace budget left out
    created_at: float = Field(default_factory=time.time)
    in_progress_at: float | None = None
    completed_at: float | None = None
    cancelled_at: float | None = None

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @property
    def queued(self) -> int:
        return max(0, self.total - self.done - self.running - self.held - self.parked)

    def openai_object(self) -> dict[str, Any]:
        """The batch as OpenAI's batch object, with routerq's finer counts beside OpenAI's three."""
        return {
            "id": self.id,
            "object": "batch",
            "status": self.status.value,
            "input_file": self.input_file,
            "request_counts": {
                "total": self.total,
                "completed": self.succeeded,
                "failed": self.failed,
                "queued": self.queued,
                "running": self.running,
                "held": self.held,
                "parked": self.parked,
                "succeeded": self.succeeded,
                "cancelled": self.cancelled,
            },
            "usage": {
                "input_tokens": self.prompt_tokens,
                "output_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "cost": self.cost,
            },
            "metadata": {"name": self.name, **self.metadata} if self.name else dict(self.metadata),
            "reason": self.reason,
            "max_cost": self.max_cost,
            "created_at": int(self.created_at),
            "in_progress_at": _int(self.in_progress_at),
            "completed_at": _int(self.completed_at),
            "cancelled_at": _int(self.cancelled_at),
        }


def _int(value: float | None) -> int | None:
    return int(value) if value is not None else None


def _outcome(raw: Any) -> Outcome:
    return Outcome(as_text(raw)[:1])


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex[:24]}"


_GO = lua_script("routerq.core", "batch_go", "batch_release")


class Go(IntEnum):
    """Why a line's call may not start now (the gate's answer when it is not a delivery count)."""

    MISSING = -1  # the batch expired
    STOPPED = -2  # cancelled, cancelling or failed
    PARKED = -3  # the batch is paused: the line was set aside
    OVER_BUDGET = -4  # the calls in flight hold the rest of the budget: come back later


# The scripts (routerq/core/lua/batch_*.lua) share batch_release.lua: giving back a line's reserved cost.
_RECORD = lua_script("routerq.core", "batch_record", "batch_release")
_PARK = lua_script("routerq.core", "batch_park", "batch_release")
_UNMARK = lua_script("routerq.core", "batch_unmark", "batch_release")
_PAUSE = lua_script("routerq.core", "batch_pause")
_UNPARK = lua_script("routerq.core", "batch_unpark")

_JSON_FIELDS = ("metadata", "origin")
_NUMBERS = {"total", "succeeded", "failed", "cancelled", "prompt_tokens", "completion_tokens"}
_STATS_QUANTILES = (0.5, 0.95, 0.99)


def _batch(raw: dict[Any, Any], taken: int, parked: int, calling: int) -> Batch | None:
    """`taken`: lines a worker has (calling, or waiting in its messages for a call slot)."""
    if not raw:
        return None
    data: dict[str, Any] = {as_text(k): as_text(v) for k, v in raw.items()}
    for name in _JSON_FIELDS:
        if name in data:
            data[name] = json.loads(data[name])
    data["running"], data["held"], data["parked"] = calling, max(0, taken - calling), parked
    return Batch.model_validate(data)


class Recorded(IntEnum):
    NO_BATCH = -1
    ALREADY = 0  # a redelivery: the line had this outcome (or a success) already
    STORED = 1
    ENDED_BATCH = 2  # this outcome was the batch's last


@dataclass(frozen=True)
class BatchStats:
    """A batch's latency and queue-wait percentiles in ms (None before any line ran)."""

    latency_ms: dict[float, float | None]
    queue_wait_ms: dict[float, float | None]
    lines: int = 0  # lines whose latency was recorded


def parse_stats(raw: dict[Any, Any]) -> BatchStats:
    latency: dict[int, int] = {}
    wait: dict[int, int] = {}
    for key, count in raw.items():
        name, _, index = as_text(key).partition(":")
        (latency if name == "lat" else wait)[int(index)] = int(count)
    return BatchStats(
        percentiles(latency, _STATS_QUANTILES), percentiles(wait, _STATS_QUANTILES), sum(latency.values())
    )


_Pipe = TypeVar("_Pipe", redis.client.Pipeline, aredis.client.Pipeline)


def _queue_batch_read(pipe: _Pipe, batch_id: str) -> _Pipe:
    """The record, taken, parked and calling counts, queued on a pipeline: its reply is `_batch`'s
    arguments."""
    pipe.hgetall(batch_key(batch_id))
    pipe.scard(batch_key(batch_id, "run"))
    pipe.scard(batch_key(batch_id, "parked"))
    pipe.scard(batch_key(batch_id, "calling"))
    return pipe


@dataclass(frozen=True)
class LineStart:
    batch: Batch | None
    line: dict[str, Any] | None
    outcome: Outcome | None


class BatchStore:
    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self._redis = client
        self._ttl = ttl
        self._unpark = client.register_script(_UNPARK)

    key = staticmethod(batch_key)

    def create(self, batch: Batch) -> None:
        fields: dict[str, Any] = {}
        for name, value in batch.model_dump(exclude_none=True).items():
            fields[name] = json.dumps(value) if name in _JSON_FIELDS else value
        pipe = self._redis.pipeline()
        pipe.hset(self.key(batch.id), mapping=fields)  # type: ignore[arg-type]
        pipe.expire(self.key(batch.id), self._ttl)
        pipe.zadd(INDEX_KEY, {batch.id: batch.created_at})
        pipe.zremrangebyscore(INDEX_KEY, "-inf", batch.created_at - self._ttl)  # their state has expired
        pipe.execute()

    def get(self, batch_id: str) -> Batch | None:
        return _batch(*_queue_batch_read(self._redis.pipeline(transaction=False), batch_id).execute())

    def set_status(self, batch_id: str, status: BatchStatus, **fields: Any) -> None:
        mapping: dict[str, str | float] = {"status": status.value, **fields}
        self._redis.hset(self.key(batch_id), mapping=mapping)  # type: ignore[arg-type]

    def stats(self, batch_id: str) -> BatchStats:
        return parse_stats(self._redis.hgetall(self.key(batch_id, "stats")))

    def recent(self, limit: int = 50) -> list[Batch]:
        ids = self._redis.zrevrange(INDEX_KEY, 0, limit - 1)
        batches = [self.get(as_text(i)) for i in ids]
        return [b for b in batches if b is not None]

    def line(self, batch_id: str, index: int) -> dict[str, Any] | None:
        raw = self._redis.hget(self.key(batch_id, "in"), str(index))
        return json.loads(raw) if raw else None

    def unpark(self, batch_id: str, status: BatchStatus, **stamp: float) -> list[int] | None:
        """Move a paused batch to `status`; its parked line indexes, or None when it was not paused."""
        field, value = next(iter(stamp.items())) if stamp else ("", 0.0)
        keys = [self.key(batch_id), self.key(batch_id, "parked")]
        parked = self._unpark(keys=keys, args=[status.value, field, value])
        return None if parked is None else sorted(int(i) for i in parked)

    def outputs(
        self, batch_id: str, total: int, page: int = 1000
    ) -> Iterator[tuple[int, Outcome | None, bytes]]:
        """Outcomes in input order, `page` per round trip, so memory stays flat in the batch size."""
        key = self.key(batch_id, "out")
        for start in range(0, total, page):
            indexes = list(range(start, min(start + page, total)))
            for index, raw in zip(indexes, self._redis.hmget(key, indexes), strict=True):
                if raw:
                    yield index, _outcome(raw), raw[1:] if isinstance(raw, bytes) else raw[1:].encode()
                else:
                    yield index, None, b""

    def indexes_with(self, batch_id: str, outcomes: set[Outcome]) -> Iterator[int]:
        for field, value in self._redis.hscan_iter(self.key(batch_id, "out"), count=1000):
            if _outcome(value) in outcomes:
                yield int(field)

    def claim_idempotency_key(self, key: str, batch_id: str) -> str | None:
        """Returns the batch that already owns `key`, or None when this batch now owns it."""
        name = IDEMPOTENCY_KEY.format(key=key)
        if self._redis.set(name, batch_id, nx=True, ex=self._ttl):
            return None
        owner = self._redis.get(name)
        return as_text(owner) if owner else None

    def discard_staging(self, batch_id: str) -> None:
        self._redis.delete(self.key(batch_id, "staging"))

    def release_idempotency_key(self, key: str) -> None:
        self._redis.delete(IDEMPOTENCY_KEY.format(key=key))


class AsyncBatchStore:
    """The worker's side of a batch, on redis.asyncio: start a line, then record, park or pause it."""

    key = staticmethod(batch_key)

    def __init__(self, client: aredis.Redis, ttl: int) -> None:
        self._redis = client
        self._ttl = ttl
        self._record = client.register_script(_RECORD)
        self._park = client.register_script(_PARK)
        self._go = client.register_script(_GO)
        self._unmark = client.register_script(_UNMARK)
        self._pause = client.register_script(_PAUSE)

    async def begin(self, batch_id: str, indexes: list[int], mark: bool = True) -> list[LineStart]:
        """What a worker needs before it may run lines of one message, in one round trip: the batch,
        each line, its outcome so far. With `mark` the lines are marked running at once; every path
        that does not run one records, parks or unmarks it. An upstream batch's lines are not marked:
        OpenRouter holds them, not a worker."""
        fields = [str(i) for i in indexes]
        pipe = self._redis.pipeline(transaction=False)
        if mark:
            pipe.sadd(self.key(batch_id, "run"), *indexes)
            pipe.expire(self.key(batch_id, "run"), self._ttl)
        pipe.hgetall(self.key(batch_id))
        pipe.hmget(self.key(batch_id, "in"), fields)
        pipe.hmget(self.key(batch_id, "out"), fields)
        raw, lines, outcomes = (await pipe.execute())[-3:]
        batch = _batch(raw, 0, 0, 0)
        return [
            LineStart(batch, json.loads(line) if line else None, _outcome(outcome) if outcome else None)
            for line, outcome in zip(lines, outcomes, strict=True)
        ]

    async def get(self, batch_id: str) -> Batch | None:
        return _batch(*await _queue_batch_read(self._redis.pipeline(transaction=False), batch_id).execute())

    async def stats(self, batch_id: str) -> BatchStats:
        return parse_stats(await self._redis.hgetall(self.key(batch_id, "stats")))

    async def latency_p99(self, batch_id: str) -> tuple[int, float | None]:
        """How many lines' latencies the batch has recorded, and their p99 in ms."""
        stats = await self.stats(batch_id)
        return stats.lines, stats.latency_ms.get(0.99)

    async def unmark_running(self, batch_id: str, index: int) -> None:
        keys = [
            self.key(batch_id),
            self.key(batch_id, "run"),
            self.key(batch_id, "held"),
            self.key(batch_id, "calling"),
        ]
        await self._unmark(keys=keys, args=[index])

    async def go(self, batch_id: str, index: int, delivery_key: str) -> int:
        """The message's delivery count when the line's call may start now, else a Go verdict (_GO)."""
        keys = [
            self.key(batch_id),
            self.key(batch_id, "held"),
            self.key(batch_id, "parked"),
            self.key(batch_id, "run"),
            delivery_key,
            self.key(batch_id, "calling"),
        ]
        return int(await self._go(keys=keys, args=[index, self._ttl, DELIVERY_KEY_TTL_S]))

    async def park(self, batch_id: str, index: int) -> bool:
        keys = [
            self.key(batch_id),
            self.key(batch_id, "parked"),
            self.key(batch_id, "run"),
            self.key(batch_id, "held"),
            self.key(batch_id, "calling"),
        ]
        return bool(await self._park(keys=keys, args=[index, self._ttl]))

    async def add_cost(self, batch_id: str, cost: float) -> None:
        """Spend that answered no line: an upstream batch finishing after its routerq batch was
        cancelled (OpenRouter's batches cannot be cancelled)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrbyfloat(self.key(batch_id), "cost", cost)
        pipe.hincrbyfloat(self.key(batch_id), "cost_after_cancel", cost)
        pipe.hincrbyfloat(COUNTERS_KEY, "cost", cost)
        await pipe.execute()

    async def pause(self, batch_id: str, reason: str) -> bool:
        return bool(await self._pause(keys=[self.key(batch_id)], args=[reason]))

    async def record(
        self,
        batch_id: str,
        index: int,
        outcome: Outcome,
        line: dict[str, Any],
        result: JobResult | None,
        *,
        traced: bool | None = None,
        retries: int = 0,
    ) -> Recorded:
        """Store a line's outcome with its usage, latency, queue wait and whether its trace was kept
        (None: this worker does not trace)."""
        usage = result.usage if result and result.usage else None
        started, finished = (result.started_at, result.finished_at) if result else (None, None)
        keys = [
            self.key(batch_id),
            self.key(batch_id, "out"),
            self.key(batch_id, "run"),
            self.key(batch_id, "stats"),
            self.key(batch_id, "held"),
            self.key(batch_id, "calling"),
            COUNTERS_KEY,
        ]
        args = [
            index,
            outcome.value,
            json.dumps(line, separators=(",", ":")),
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
            repr(usage.cost or 0.0) if usage else "0",
            time.time(),
            self._ttl,
            "" if traced is None else ("traced" if traced else "sampled_out"),
            retries,
            bucket((finished - started) * 1000) if started and finished else "",
            bucket((started - result.enqueued_at) * 1000) if started and finished and result else "",
        ]
        return Recorded(int(await self._record(keys=keys, args=args)))
