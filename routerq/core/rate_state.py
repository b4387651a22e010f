"""What the shared limiter keeps in Redis per scope (all models: `*`; each model), and what
`routerq status` and `/metrics` read back from it: the rate discovered for each model, and how many of
its calls upstream refused.

Keys, per scope:
  routerq:limit:{scope}:req     zset  grants in the configured window (ROUTERQ_RPM and friends)
  routerq:limit:{scope}:tok     zset  token estimates in that window
  routerq:limit:{scope}:fly     zset  calls in flight, by lease expiry
  routerq:limit:{scope}:state   hash  rate (discovered calls/s); increased, decreased, refused_at,
                                      cooldown (ms); granted, refused,
                                      refused:{provider|openrouter|in_flight}; noise (the share
                                      refused at any pace); episode_rate, episode_share (where the
                                      congestion being cut began), hold (no increase until then, ms)
  routerq:limit:{scope}:recent  zset  grants of the last two seconds (what the discovered rate paces)
  routerq:limit:{scope}:ok      zset  calls upstream answered, of the last five seconds (what it admits)
  routerq:limit:{scope}:no      zset  calls upstream refused, of the last five seconds
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from routerq.core.redis_client import as_text

if TYPE_CHECKING:  # a reading command (`routerq status`) never imports redis.asyncio
    import redis.asyncio as aredis

GLOBAL_SCOPE = "*"


def limit_keys(scope: str) -> list[str]:
    base = f"routerq:limit:{{{scope}}}"
    return [f"{base}:{name}" for name in ("req", "tok", "fly", "state", "recent", "ok", "no")]


@dataclass(frozen=True)
class ModelRate:
    model: str
    rate: float | None  # calls per second routerq paces this model at; None until upstream refused one
    granted: int  # calls started (the last hour, as the state lives)
    refused: int  # of which upstream refused (429, temporary 402)
    noise: float | None = None  # the share a flaky provider refuses at any pace, once told from a limit

    @property
    def refused_share(self) -> float:
        return self.refused / self.granted if self.granted else 0.0


STATE_MATCH = "routerq:limit:{*}:state"
STATE_FIELDS = ("rate", "granted", "refused", "noise")


def _model_rate(key: Any, values: list[Any]) -> ModelRate | None:
    scope = as_text(key)[len("routerq:limit:{") : -len("}:state")]
    if scope == GLOBAL_SCOPE:
        return None
    rate, granted, refused, noise = values
    return ModelRate(
        scope,
        float(rate) if rate else None,
        int(granted or 0),
        int(refused or 0),
        float(noise) if noise else None,
    )


def model_rates(client: redis.Redis) -> list[ModelRate]:
    found = (_model_rate(k, client.hmget(k, STATE_FIELDS)) for k in client.scan_iter(match=STATE_MATCH))
    return sorted((r for r in found if r is not None), key=lambda r: r.model)


async def model_rates_async(client: aredis.Redis) -> list[ModelRate]:
    found = [
        _model_rate(k, await client.hmget(k, STATE_FIELDS)) async for k in client.scan_iter(match=STATE_MATCH)
    ]
    return sorted((r for r in found if r is not None), key=lambda r: r.model)
