"""Embedding backfill state in Redis: texts to embed and their vectors, stored as raw float32.

Keys (`{id}` is the run id, derived from the input file, model and options, so a re-run finds it):
  routerq:embed:{id}        hash  the run: model, dimensions, total, done, failed, tokens, cost
  routerq:embed:{id}:in     hash  index -> {"id", "text"}
  routerq:embed:{id}:vec    hash  index -> little-endian float32 bytes (4 bytes a dimension, no JSON)
  routerq:embed:{id}:claim  hash  index -> "{until} {message id}": the request sending that text now
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import redis
import redis.asyncio as aredis
from pydantic import BaseModel, Field

from routerq.core.batch_store import Via
from routerq.core.counters import COUNTERS_KEY
from routerq.core.lua import lua_script
from routerq.core.redis_client import as_text


class EmbedRun(BaseModel):
    id: str
    model: str
    dimensions: int | None = None
    total: int = 0
    done: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cost: float = 0.0
    input_file: str = ""
    via: Via = Via.LIVE  # batch: requests go as OpenRouter batches (routerq.core.upstream_batch)
    project: str | None = None  # the submitter's Phoenix project
    created_at: float = Field(default_factory=time.time)


_CLAIM = lua_script("routerq.core", "embed_claim")
_STORE = lua_script("routerq.core", "embed_store")
_RECOUNT = lua_script("routerq.core", "embed_recount")


def embed_key(run_id: str, part: str = "") -> str:
    return f"routerq:embed:{run_id}" + (f":{part}" if part else "")


class EmbedStore:
    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self._redis = client
        self._ttl = ttl
        self._recount = client.register_script(_RECOUNT)

    key = staticmethod(embed_key)

    def save(self, run: EmbedRun) -> None:
        fields = {k: v for k, v in run.model_dump(exclude_none=True).items() if k not in ("done", "failed")}
        pipe = self._redis.pipeline()
        pipe.hset(self.key(run.id), mapping=fields)  # type: ignore[arg-type]
        self._recount(keys=[self.key(run.id), self.key(run.id, "vec")], client=pipe)
        pipe.expire(self.key(run.id), self._ttl)
        pipe.execute()

    def get(self, run_id: str) -> EmbedRun | None:
        raw = self._redis.hgetall(self.key(run_id))
        if not raw:
            return None
        return EmbedRun.model_validate({as_text(k): as_text(v) for k, v in raw.items()})

    def missing(self, run_id: str, total: int, page: int = 2000) -> Iterator[int]:
        """Indexes with no stored vector, in input order."""
        for start in range(0, total, page):
            yield from self.missing_of(run_id, list(range(start, min(start + page, total))))

    def missing_of(self, run_id: str, indexes: list[int]) -> list[int]:
        key = self.key(run_id, "vec")
        pipe = self._redis.pipeline(transaction=False)
        for index in indexes:
            pipe.hexists(key, str(index))
        return [index for index, present in zip(indexes, pipe.execute(), strict=True) if not present]

    def vectors(self, run_id: str, total: int, page: int = 500) -> Iterator[tuple[str, bytes | None]]:
        """(id, raw vector) in input order, `page` per round trip."""
        for start in range(0, total, page):
            indexes = list(range(start, min(start + page, total)))
            pipe = self._redis.pipeline(transaction=False)
            pipe.hmget(self.key(run_id, "in"), indexes)
            pipe.hmget(self.key(run_id, "vec"), indexes)
            inputs, vectors = pipe.execute()
            for raw_in, raw_vec in zip(inputs, vectors, strict=True):
                yield json.loads(raw_in)["id"], raw_vec


class AsyncEmbedStore:
    """The worker's side of an embedding run, on redis.asyncio: read texts, store vectors."""

    key = staticmethod(embed_key)

    def __init__(self, client: aredis.Redis, ttl: int, claim_s: float) -> None:
        self._redis = client
        self._ttl = ttl
        self._claim_s = claim_s
        self._claim = client.register_script(_CLAIM)
        self._store = client.register_script(_STORE)

    async def get(self, run_id: str) -> EmbedRun | None:
        raw = await self._redis.hgetall(self.key(run_id))
        if not raw:
            return None
        return EmbedRun.model_validate({as_text(k): as_text(v) for k, v in raw.items()})

    async def texts(self, run_id: str, indexes: list[int]) -> list[str | None]:
        values = await self._redis.hmget(self.key(run_id, "in"), indexes)
        return [json.loads(v)["text"] if v else None for v in values]

    async def claim(
        self, run_id: str, indexes: list[int], owner: str, hold: float | None = None
    ) -> list[int]:
        """The indexes this request is to send: no vector yet, and no other live request holds them.
        The claim lasts `hold` seconds (default: as long as a call may)."""
        keys = [self.key(run_id, "vec"), self.key(run_id, "claim")]
        args: list[str | int] = [owner, int(hold or self._claim_s) + 1, self._ttl, *indexes]
        return [int(index) for index in await self._claim(keys=keys, args=args)]

    async def store_vectors(self, run_id: str, vectors: dict[int, bytes], tokens: int, cost: float) -> int:
        """Store new vectors only and count them, in one step (embed_store.lua)."""
        keys = [self.key(run_id, "vec"), self.key(run_id, "claim"), self.key(run_id), COUNTERS_KEY]
        args: list[str | int | float | bytes] = [self._ttl, tokens, cost]
        for index, raw in vectors.items():
            args += [index, raw]
        return int(await self._store(keys=keys, args=args))

    async def let_go(self, run_id: str, indexes: list[int]) -> None:
        """Drop the claims on these texts: another request (a retry) may take them."""
        if indexes:
            await self._redis.hdel(self.key(run_id, "claim"), *indexes)

    async def record_failure(self, run_id: str, indexes: list[int]) -> None:
        """Count the texts failed and let go of them: a re-run sends them again."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hincrby(self.key(run_id), "failed", len(indexes))
        pipe.hincrby(COUNTERS_KEY, "texts:failed", len(indexes))
        if indexes:
            pipe.hdel(self.key(run_id, "claim"), *indexes)
        await pipe.execute()
