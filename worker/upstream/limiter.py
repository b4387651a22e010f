"""A rate limiter shared by every worker on every machine, kept in Redis.

OpenRouter's limits are per account, so per-worker limits cannot hold them. Each scope (all models,
and each model with its own limits) has, over a sliding window: a request count, a token count
(estimated before the call, corrected from `usage` after), and in-flight leases that expire by
themselves if a worker dies. A 429 from upstream halves the scope's effective request rate for every
worker and sets a cool-down from Retry-After; the rate recovers (doubling each `RECOVERY_S`) on its own.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aredis

from routerq.core.settings import Settings

RECOVERY_S = 10.0
LEASE_TTL_S = 300.0
# A grant is counted for window + SKEW_S: the request reaches OpenRouter a little after it is granted
# (more under CPU load), and OpenRouter counts arrivals, not grants.
SKEW_S = 0.25

# KEYS: 4 per scope (requests zset, tokens zset, in-flight zset, state hash)
# ARGV: now_ms, window_ms, lease, lease_expiry_ms, tokens, recovery_ms, then 3 limits per scope
_ACQUIRE = """
local now, window, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local lease_until, tokens, recovery = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local wait = 0
local scopes = #KEYS / 4
for s = 0, scopes - 1 do
  local req, tok, fly, st = KEYS[s*4+1], KEYS[s*4+2], KEYS[s*4+3], KEYS[s*4+4]
  local max_req, max_tok, max_fly = tonumber(ARGV[7+s*3]), tonumber(ARGV[8+s*3]), tonumber(ARGV[9+s*3])
  local state = redis.call('HMGET', st, 'factor', 'last429', 'cooldown')
  local cooldown = tonumber(state[3] or 0)
  if cooldown > now then wait = math.max(wait, cooldown - now) end
  local factor = 1
  if state[1] then
    factor = math.min(1, tonumber(state[1]) * math.pow(2, (now - tonumber(state[2])) / recovery))
  end
  redis.call('ZREMRANGEBYSCORE', req, '-inf', now - window)
  redis.call('ZREMRANGEBYSCORE', tok, '-inf', now - window)
  redis.call('ZREMRANGEBYSCORE', fly, '-inf', now)
  if max_req > 0 then
    local allowed = math.max(1, math.floor(max_req * factor))
    if redis.call('ZCARD', req) >= allowed then
      local oldest = redis.call('ZRANGE', req, 0, 0, 'WITHSCORES')
      local count = redis.call('ZCARD', req)
      local nth = redis.call('ZRANGE', req, count - allowed, count - allowed, 'WITHSCORES')
      wait = math.max(wait, tonumber(nth[2] or oldest[2]) + window - now)
    end
  end
  if max_tok > 0 then
    local used = 0
    for _, member in ipairs(redis.call('ZRANGE', tok, 0, -1)) do
      used = used + tonumber(string.match(member, ':(%d+)$'))
    end
    if used > 0 and used + tokens > max_tok then
      local oldest = redis.call('ZRANGE', tok, 0, 0, 'WITHSCORES')
      wait = math.max(wait, tonumber(oldest[2]) + window - now)
    end
  end
  if max_fly > 0 and redis.call('ZCARD', fly) >= max_fly then
    wait = math.max(wait, 25)
  end
end
if wait > 0 then return wait end
for s = 0, scopes - 1 do
  local req, tok, fly = KEYS[s*4+1], KEYS[s*4+2], KEYS[s*4+3]
  redis.call('ZADD', req, now, lease)
  redis.call('ZADD', tok, now, lease .. ':' .. tokens)
  redis.call('ZADD', fly, lease_until, lease)
  for _, k in ipairs({req, tok, fly}) do redis.call('PEXPIRE', k, math.floor(window * 2 + 600000)) end
end
return 0
"""

# KEYS: 4 per scope; ARGV: lease, estimated tokens, actual tokens
_RELEASE = """
for s = 0, #KEYS / 4 - 1 do
  local tok, fly = KEYS[s*4+2], KEYS[s*4+3]
  redis.call('ZREM', fly, ARGV[1])
  local estimated = ARGV[1] .. ':' .. ARGV[2]
  local at = redis.call('ZSCORE', tok, estimated)
  if at then
    redis.call('ZREM', tok, estimated)
    redis.call('ZADD', tok, at, ARGV[1] .. ':' .. ARGV[3])
  end
end
return 1
"""

# KEYS: state hash per scope; ARGV: now_ms, cooldown_ms, recovery_ms
_PENALIZE = """
local now, cooldown, recovery = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for _, st in ipairs(KEYS) do
  local state = redis.call('HMGET', st, 'factor', 'last429', 'cooldown')
  local factor = 1
  if state[1] then
    factor = math.min(1, tonumber(state[1]) * math.pow(2, (now - tonumber(state[2])) / recovery))
  end
  local until_ms = math.max(tonumber(state[3] or 0), now + cooldown)
  redis.call('HSET', st, 'factor', math.max(0.05, factor / 2), 'last429', now, 'cooldown', until_ms)
  redis.call('PEXPIRE', st, 3600000)
end
return 1
"""


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


def estimate_tokens(body: dict[str, object]) -> int:
    """Rough prompt size (4 characters a token) plus the completion budget the request allows."""
    prompt = len(json.dumps(body.get("messages") or body.get("prompt") or body.get("input") or "")) // 4
    budget = body.get("max_tokens") or body.get("max_completion_tokens") or 256
    return prompt + (int(budget) if isinstance(budget, int | float | str) and str(budget).isdigit() else 256)
