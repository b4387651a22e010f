"""A rate limiter shared by every worker on every machine, kept in Redis.

OpenRouter's limits are per account, so per-worker limits cannot hold them. Each scope (all models,
and each model with its own limits) has, over a sliding window: a request count, a token count
(estimated before the call, corrected from `usage` after), and in-flight leases that expire by
themselves if a worker dies. A 429 from upstream halves the scope's effective request rate for every
worker and sets a cool-down from Retry-After; the rate recovers (doubling each `RECOVERY_S`) on its own.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aredis

from routerq.core.lua import lua_script
from routerq.core.settings import Settings

RECOVERY_S = 10.0
LEASE_TTL_S = 300.0
# A grant is counted for window + SKEW_S: the request reaches OpenRouter a little after it is granted
# (more under CPU load), and OpenRouter counts arrivals, not grants.
SKEW_S = 0.25

_ACQUIRE = lua_script("routerq.worker.upstream", "limiter_acquire")

_RELEASE = lua_script("routerq.worker.upstream", "limiter_release")

_PENALIZE = lua_script("routerq.worker.upstream", "limiter_penalize")


@dataclass(frozen=True)
class Lease:
    id: str
    scopes: tuple[str, ...]
    tokens: int


NO_LEASE = Lease("", (), 0)
COOLDOWN_CACHE_S = 0.1


class SharedLimiter:
    """With no limits configured, only the shared cool-down after a 429 applies; it is read from
    Redis at most every COOLDOWN_CACHE_S per process, so an unlimited worker pays no round trip per call."""

    def __init__(self, client: aredis.Redis, settings: Settings) -> None:
        self._settings = settings
        self._redis = client
        self._cooldown: dict[str, tuple[float, float]] = {}  # model -> (read at, cool-down until), seconds
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._penalize = client.register_script(_PENALIZE)

    def _scopes(self, model: str) -> list[tuple[str, tuple[int, int, int]]]:
        s = self._settings
        scopes = [("*", (s.rate_limit_requests, s.rate_limit_tokens, s.max_in_flight))]
        limits = s.model_limits.get(model)
        if limits is not None:
            scopes.append((model, (limits.requests, limits.tokens, limits.in_flight)))
        return scopes

    @staticmethod
    def _keys(scope: str) -> list[str]:
        base = f"routerq:limit:{{{scope}}}"
        return [f"{base}:req", f"{base}:tok", f"{base}:fly", f"{base}:state"]

    async def try_acquire(self, model: str, tokens: int) -> tuple[Lease | None, float]:
        """A lease, or how many seconds to wait before asking again."""
        if not self.active:
            wait = await self._cooldown_until(model) - time.time()
            return (None, wait) if wait > 0 else (NO_LEASE, 0.0)
        scopes = self._scopes(model)
        keys = [key for scope, _ in scopes for key in self._keys(scope)]
        now = int(time.time() * 1000)
        lease = uuid.uuid4().hex
        args: list[int | float | str] = [
            now,
            int((self._settings.rate_limit_window + SKEW_S) * 1000),
            lease,
            now + int(LEASE_TTL_S * 1000),
            max(0, tokens),
            int(RECOVERY_S * 1000),
        ]
        for _, limits in scopes:
            args.extend(limits)
        wait_ms = int(await self._acquire(keys=keys, args=args))
        if wait_ms > 0:
            return None, wait_ms / 1000.0
        return Lease(lease, tuple(scope for scope, _ in scopes), max(0, tokens)), 0.0

    async def _cooldown_until(self, model: str) -> float:
        now = time.time()
        read_at, until = self._cooldown.get(model, (0.0, 0.0))
        if now - read_at > COOLDOWN_CACHE_S:
            pipe = self._redis.pipeline(transaction=False)
            for scope, _ in self._scopes(model):
                pipe.hget(self._keys(scope)[3], "cooldown")
            until = max((float(v) / 1000.0 for v in await pipe.execute() if v), default=0.0)
            self._cooldown[model] = (now, until)
        return until

    async def release(self, lease: Lease, actual_tokens: int | None) -> None:
        if lease is NO_LEASE:
            return
        keys = [key for scope in lease.scopes for key in self._keys(scope)]
        actual = lease.tokens if actual_tokens is None else actual_tokens
        await self._release(keys=keys, args=[lease.id, lease.tokens, actual])

    async def penalize(self, model: str, cooldown_s: float) -> None:
        """An upstream 429: every worker slows down, not only the one that got it."""
        keys = [self._keys(scope)[3] for scope, _ in self._scopes(model)]
        await self._penalize(
            keys=keys, args=[int(time.time() * 1000), int(cooldown_s * 1000), int(RECOVERY_S * 1000)]
        )

    @property
    def active(self) -> bool:
        """Whether any limit is configured (otherwise only the cool-down after a 429 applies)."""
        s = self._settings
        return bool(s.rate_limit_requests or s.rate_limit_tokens or s.max_in_flight or s.model_limits)
