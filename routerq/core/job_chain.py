"""One live chain of messages, and at most one call at a time, per single job.

A single job goes on from message to message (each retry is a new message with a countdown). Should a
second message of the job ever exist (a message put back while its holder still lived, a lost-message
re-send racing the original), the two must not both call upstream and both retry: that is paid twice,
and each copy retries on its own. So each re-publish names a new generation in Redis and carries it;
right before a call (slot held), the job's message must be of the current generation, the job must have
no outcome yet, its countdown must be over and no other run may hold the call (routerq/core/lua/
job_go.lua). A copy that is not current ends without a call; one that comes early waits.

Keys:
  routerq:job:{job_id}:chain   hash  gen, due (ms), holder, held_until (ms), note (why it waits)
"""

from __future__ import annotations

import uuid
from enum import IntEnum

import redis
import redis.asyncio as aredis

from routerq.core.batch_store import DELIVERY_KEY_TTL_S
from routerq.core.lua import lua_script
from routerq.core.redis_client import as_text
from routerq.core.result_store import RESULT_KEY

CHAIN_KEY = "routerq:job:{job_id}:chain"

_GO = lua_script("routerq.core", "job_go")
_NEXT = lua_script("routerq.core", "job_next")


class JobGo(IntEnum):
    """The gate's verdict on a job's call (with its value: deliveries, or ms to wait)."""

    GO = 0  # the call starts: the job is held by this run; the value is the message's deliveries
    WAIT = 1  # the job's countdown, or another run calling: the value is ms to wait
    FINAL = -2  # the job has its outcome: it is never called again
    STALE = -5  # a later message of the job exists: this copy ends


def _keys(job_id: str) -> list[str]:
    return [RESULT_KEY.format(job_id=job_id), CHAIN_KEY.format(job_id=job_id)]


class AsyncJobChain:
    """The worker's side, on redis.asyncio."""

    def __init__(self, client: aredis.Redis, ttl: int) -> None:
        self._ttl = ttl
        self._go = client.register_script(_GO)
        self._next = client.register_script(_NEXT)

    async def go(
        self, job_id: str, generation: str, owner: str, hold_s: float, delivery_key: str
    ) -> tuple[JobGo, int]:
        """GO with the message's deliveries (the job is held by `owner` for `hold_s`), WAIT with ms
        to wait first, FINAL or STALE."""
        args: list[str | int] = [generation, owner, int(hold_s * 1000), self._ttl, DELIVERY_KEY_TTL_S]
        verdict, value = await self._go(keys=[*_keys(job_id), delivery_key], args=args)
        return JobGo(int(verdict)), int(value)

    async def advance(self, job_id: str, delay_s: float, note: str) -> str:
        """A new generation for the job's next message, due in `delay_s`; returns it."""
        generation = uuid.uuid4().hex[:16]
        args: list[str | int] = [generation, int(delay_s * 1000), note, self._ttl]
        await self._next(keys=_keys(job_id), args=args)
        return generation


def current_generation(client: redis.Redis, job_id: str) -> str:
    """What a re-sent message of the job must carry to be its continuation."""
    return as_text(client.hget(CHAIN_KEY.format(job_id=job_id), "gen") or b"")


def waiting_note(client: redis.Redis, job_id: str) -> str | None:
    """Why a job without an outcome waits (a rate limit, a retry), for a producer that waits on it."""
    note = client.hget(CHAIN_KEY.format(job_id=job_id), "note")
    return as_text(note) if note else None
