"""Lines sent through OpenRouter's Batch API (`submit --via batch`): which lines it takes, how they are
grouped into upstream batches, and where each upstream batch's state is kept.

OpenRouter runs one endpoint and one model per batch, text only, up to 5,000 requests. A line it
cannot take (a completion: no such batch endpoint; an image, audio or file part; an embeddings body
with a `provider` field) runs live instead, at the live price: that is routerq's choice over failing
it, and `routerq status` counts such lines.

Keys (beside the batch's own, see routerq.core.batch_store; an embedding run's are the same under
routerq:embed:{id}):
  routerq:batch:{id}:chunk:{chunk}   hash  status, upstream id, submitted_at, polls, endpoint, model
  routerq:batch:{id}:chunks          hash  chunk id -> its status, for `routerq status`
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NewType

import redis

from routerq.core.batch_store import batch_key
from routerq.core.counters import COUNTERS_KEY, OPEN_UPSTREAM_KEY
from routerq.core.embed_store import embed_key
from routerq.core.jobs import JobKind
from routerq.core.lua import lua_script
from routerq.core.redis_client import as_text

if TYPE_CHECKING:  # a reading command (`routerq status`) never imports redis.asyncio
    import redis.asyncio as aredis

BATCH_ENDPOINTS = {JobKind.CHAT: "/v1/chat/completions", JobKind.EMBEDDING: "/v1/embeddings"}


class ChunkStatus(StrEnum):
    NEW = "new"
    SUBMITTING = "submitting"  # asked OpenRouter; its batch id not stored yet (the ambiguous window)
    SUBMITTED = "submitted"  # OpenRouter has it: it is polled until it ends
    DONE = "done"  # every line has its outcome, or went back to run again


def refusal(kind: JobKind, body: dict[str, Any]) -> str | None:
    """Why OpenRouter's batches cannot take this line (it runs live), or None."""
    if kind not in BATCH_ENDPOINTS:
        return f"{kind.value} has no batch endpoint"
    if kind is JobKind.EMBEDDING:
        return "embeddings with a provider field" if "provider" in body else None
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            not isinstance(part, dict) or part.get("type") != "text" for part in content
        ):
            return "images, audio and files are not taken by OpenRouter's batches"
    return None


@dataclass
class _Group:
    indexes: list[int] = field(default_factory=list)
    size: int = 0


class Chunker:
    """Lines grouped by (endpoint, model) into upstream batches of at most `max_requests` requests
    and `max_bytes` of request bodies; a full group is handed out as soon as it fills."""

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self._max_requests, self._max_bytes = max_requests, max_bytes
        self._groups: dict[tuple[str, str], _Group] = {}

    def add(self, index: int, kind: JobKind, body: dict[str, Any], size: int) -> Iterator[list[int]]:
        key = (BATCH_ENDPOINTS[kind], str(body.get("model")))
        group = self._groups.setdefault(key, _Group())
        if group.indexes and (
            len(group.indexes) >= self._max_requests or group.size + size > self._max_bytes
        ):
            yield group.indexes
            group = self._groups[key] = _Group()
        group.indexes.append(index)
        group.size += size

    def rest(self) -> Iterable[list[int]]:
        return [g.indexes for g in self._groups.values() if g.indexes]


def new_chunk_id() -> str:
    return uuid.uuid4().hex[:12]


# The key of the record a chunk belongs to: a batch's or an embedding run's.
ChunkOwner = NewType("ChunkOwner", str)


def batch_owner(batch_id: str) -> ChunkOwner:
    return ChunkOwner(batch_key(batch_id))


def embed_owner(run_id: str) -> ChunkOwner:
    return ChunkOwner(embed_key(run_id))


def chunk_key(owner: ChunkOwner, chunk_id: str) -> str:
    return f"{owner}:chunk:{chunk_id}"


def chunks_key(owner: ChunkOwner) -> str:
    return f"{owner}:chunks"


_RESERVE = lua_script("routerq.core", "batch_reserve")
_UNRESERVE = lua_script("routerq.core", "batch_unreserve", "batch_release")


class AsyncChunkStore:
    """The worker's side: one upstream batch's state, durable across worker deaths."""

    def __init__(self, client: aredis.Redis, ttl: int) -> None:
        self._redis = client
        self._ttl = ttl
        self._reserve = client.register_script(_RESERVE)
        self._unreserve = client.register_script(_UNRESERVE)

    async def reserve(self, batch_id: str, chunk_id: str, estimate: float | None, lines: int) -> int:
        """How many of the chunk's lines its batch's budget lets it submit now (batch_reserve.lua)."""
        keys = [batch_key(batch_id), batch_key(batch_id, "held"), chunk_key(batch_owner(batch_id), chunk_id)]
        args: list[str | int] = [
            f"chunk:{chunk_id}",
            "" if estimate is None else repr(estimate),
            lines,
            self._ttl,
        ]
        return int(await self._reserve(keys=keys, args=args))

    async def unreserve(self, batch_id: str, chunk_id: str) -> None:
        keys = [batch_key(batch_id), batch_key(batch_id, "held"), batch_key(batch_id, "calling")]
        await self._unreserve(keys=keys, args=[f"chunk:{chunk_id}"])

    async def get(self, owner: ChunkOwner, chunk_id: str) -> dict[str, str]:
        raw = await self._redis.hgetall(chunk_key(owner, chunk_id))
        return {as_text(k): as_text(v) for k, v in raw.items()}

    async def set(self, owner: ChunkOwner, chunk_id: str, status: ChunkStatus, **fields: str | float) -> None:
        pipe = self._redis.pipeline(transaction=True)
        mapping: dict[str, str | float] = {"status": status.value, **fields}
        pipe.hset(chunk_key(owner, chunk_id), mapping=mapping)  # type: ignore[arg-type]
        pipe.expire(chunk_key(owner, chunk_id), self._ttl)
        pipe.hset(chunks_key(owner), chunk_id, str(fields.get("upstream_status") or status.value))
        pipe.expire(chunks_key(owner), self._ttl)
        if status is ChunkStatus.SUBMITTED:
            pipe.sadd(OPEN_UPSTREAM_KEY, chunk_key(owner, chunk_id))
        elif status is ChunkStatus.DONE:
            pipe.srem(OPEN_UPSTREAM_KEY, chunk_key(owner, chunk_id))
        replies = await pipe.execute()
        if status is ChunkStatus.DONE and replies[-1] and fields.get("upstream_status"):
            await self._redis.hincrby(COUNTERS_KEY, f"upstream:{fields['upstream_status']}", 1)

    async def polled(self, owner: ChunkOwner, chunk_id: str, upstream_status: str) -> int:
        """Count a poll and note what OpenRouter said; returns the polls so far."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(chunk_key(owner, chunk_id), "polls", 1)
        pipe.hset(chunk_key(owner, chunk_id), "upstream_status", upstream_status)
        pipe.hset(chunks_key(owner), chunk_id, upstream_status)
        polls, _, _ = await pipe.execute()
        return int(polls)


def upstream_batches(client: redis.Redis, owner: ChunkOwner) -> dict[str, int]:
    """How many upstream batches a batch (or embedding run) has, by their last known status; `owner`
    is the record's key."""
    counts: dict[str, int] = {}
    for status in client.hvals(chunks_key(owner)):
        counts[as_text(status)] = counts.get(as_text(status), 0) + 1
    return counts
