"""A rate limiter shared by every worker on every machine, kept in Redis (routerq.core.rate_state).

OpenRouter's limits are per account, and its providers' per model; nobody publishes them, so
per-worker limits can neither hold nor find them. Configured limits (all models, and per model) are
hard caps over a sliding window: a request count, a token count (estimated before the call, corrected
from `usage` after), and in-flight leases that expire by themselves if a worker dies. Below them, each
model's rate is discovered: unpaced until upstream first refuses a call, then paced at a rate that
grows while calls succeed and drops by BETA at each refusal (AIMD), one value for every host; a share
of refusals that cutting does not lower is a flaky provider's, tolerated rather than cut for.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aredis

from routerq.core.lua import lua_script
from routerq.core.rate_state import GLOBAL_SCOPE, limit_keys
from routerq.core.settings import Settings

LEASE_TTL_S = 300.0
# A grant is counted for window + SKEW_S: the request reaches OpenRouter a little after it is granted
# (more under CPU load), and OpenRouter counts arrivals, not grants.
SKEW_S = 0.25
# Rate discovery (routerq.core.rate_state): after a refusal the model's rate is cut to BETA of itself
# (an AIMD sawtooth between BETA*L and L averages (1+BETA)/2 of the hidden limit L); while callers
# press it, it grows by INCREASE_STEP of itself every INCREASE_S: 8 % a second, so a cut is won back in
# about 1.3 s and a limit that doubled is found in about 9 s. A cut starts from the lower of the rate and
# what upstream answered in the last second: a limit that halved is found at once.
BETA = 0.9
INCREASE_S = 0.25
INCREASE_STEP = 0.02
# The longer upstream refuses nothing, the faster the rate grows: the step times 1 + (t /
# INCREASE_QUIET_S)^2 after t seconds without a refusal (t counted up to twice that: at most 5x the
# step). Riding a limit, refusals come every second or two and the step barely changes (1.1x at 1.3 s);
# a limit that doubled is found in 3.4-4.4 s (8.5-10.7 s without it, against a floor of 10).
INCREASE_QUIET_S = 4.0
# After a cut the rate grows RECOVER_STEPS times the step until it is back within 5 % of where the cut
# began (a cut begins a little over the limit): the sawtooth's dip (0.9 L for a second and more) was
# most of what it lost to the limit (per-second ok calls 87-100 at R = 100, 0.90-0.93 R on average;
# 0.93-0.95 R with it). Three times, and up to 3 % from the cut, refused 4.4 % of calls on one host.
RECOVER_STEPS = 2.0
# A paced model's grants are spaced evenly, 1/rate apart, a grant coming at most PACE_BURST_S ahead
# of its turn (a waiter that woke late is not robbed of its slot). Without spacing, grants came in the
# bursts of the second before (waiters all wake when one slot frees), and a burst that reached
# upstream late, beside the next that came on time, overfilled its rolling second: a 10/s model paced
# at 8-9/s was still refused 15-20 % of its calls.
PACE_BURST_S = 0.1
# A model is paced from its first refusal only when that second saw at least this many of its calls:
# a 429 amid a trickle (a provider's hiccup, one job) says nothing of a rate, and pacing a quiet model
# at one call a second would slow its next batch for a minute.
MIN_SEED = 10
# A model's discovered rate (and its counts) is forgotten this long after its last refusal: a limit
# that no longer bites should not pace the next batch, which would ramp up from it at 8 % a second.
RATE_MEMORY_S = 120.0
# After a decrease, refusals for this long are upstream's window still full of calls sent at the old
# rate: counted, not cut again (else one burst cuts the rate several times over).
DECREASE_GUARD_S = 1.0
# Refusals that are not a rate (a flaky provider refuses a share of calls at any pace) must not cut
# the rate down to nothing. Cuts each within EPISODE_GAP_S of the last are an episode; one that began
# with NOISE_MIN to 40 % of the calls refused (or fell into that range after beginning higher) is a
# probe: from its second cut the rate is held, and once it is down to PROBE_DEPTH of where it began
# (three cuts) it is cut no more until the calls that end from DECREASE_GUARD_S after its last cut
# (upstream's window then holds only calls sent at the new rate; at least PROBE_CALLS of them) give
# the verdict. A limit refuses a much smaller share of
# them than it did at the start (none, if the rate is now under it); a share still at least
# PROBE_RATIO of the first is the provider's: the model is not paced any more, and refusals within
# NOISE_Z standard deviations of that share neither pace, nor cut, nor hold it. Riding a limit,
# refusals are few (a share under NOISE_MIN) and a cut is won back before the next, so the sawtooth
# never probes; a limit that fell far (over 40 % refused) is cut to what upstream answered.
EPISODE_GAP_S = 2.0
PROBE_DEPTH = 0.75
PROBE_RATIO = 0.5  # a limit probed from under 40 % refused refuses under half of that at 0.75
NOISE_MIN = 0.05
NOISE_Z = 3.0
PROBE_CALLS = 40  # fewer make a share too rough to judge (+-0.07 at 25 %)
# Answered and refused calls are kept this long: a probe's shares are counted over PROBE_CALLS calls
# however long they take to come, and under load (a shared CI machine) a model that should run at
# hundreds of calls a second may run at a few; a probe whose calls took longer than a whole second
# each window (as before) never gave a verdict, and its episode went on cutting to nothing.
CALLS_KEPT_S = 30.0
# A Retry-After longer than this means a window of minutes (a free model's requests per minute), not a
# rate: every call of the model waits it out. Shorter ones are the refused call's own wait.
COOLDOWN_AFTER_S = 5.0

_ACQUIRE = lua_script("routerq.worker.upstream", "limiter_acquire")
_RELEASE = lua_script("routerq.worker.upstream", "limiter_release")
_PENALIZE = lua_script("routerq.worker.upstream", "limiter_penalize")


@dataclass(frozen=True)
class Lease:
    id: str
    scopes: tuple[str, ...]
    tokens: int
    granted_ms: int = 0


class SharedLimiter:
    """One Lua call a call: the configured caps (all models and per model) and the model's
    discovered rate, shared by every worker on every host."""

    def __init__(self, client: aredis.Redis, settings: Settings) -> None:
        self._settings = settings
        self._redis = client
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._penalize = client.register_script(_PENALIZE)
        self._rates: dict[str, tuple[float | None, float]] = {}  # model -> (rate, read at, monotonic)

    def _scopes(self, model: str) -> list[tuple[str, tuple[int, int, int, int]]]:
        s = self._settings
        limits = s.model_limits.get(model)
        mine = (limits.requests, limits.tokens, limits.in_flight) if limits is not None else (0, 0, 0)
        return [
            (GLOBAL_SCOPE, (s.rate_limit_requests, s.rate_limit_tokens, s.max_in_flight, 0)),
            (model, (*mine, int(s.rate_discovery))),
        ]

    async def try_acquire(self, model: str, tokens: int) -> tuple[Lease | None, float]:
        """A lease, or how many seconds to wait before asking again."""
        scopes = self._scopes(model)
        keys = [key for scope, _ in scopes for key in limit_keys(scope)]
        now = int(time.time() * 1000)
        lease = uuid.uuid4().hex
        args: list[int | float | str] = [
            now,
            int((self._settings.rate_limit_window + SKEW_S) * 1000),
            lease,
            now + int(LEASE_TTL_S * 1000),
            max(0, tokens),
            int(INCREASE_S * 1000),
            INCREASE_STEP,
            int(PACE_BURST_S * 1000),
            int(INCREASE_QUIET_S * 1000),
            RECOVER_STEPS,
        ]
        for _, limits in scopes:
            args.extend(limits)
        wait_ms = int(await self._acquire(keys=keys, args=args))
        if wait_ms > 0:
            return None, wait_ms / 1000.0
        return Lease(lease, tuple(scope for scope, _ in scopes), max(0, tokens), now), 0.0

    async def paced_rate(self, model: str) -> float | None:
        """The model's discovered rate (calls/s), None while it is not paced; read at most every
        INCREASE_S (the rate changes no faster)."""
        if not self._settings.rate_discovery:
            return None
        now = time.monotonic()
        cached = self._rates.get(model)
        if cached is not None and now - cached[1] < INCREASE_S:
            return cached[0]
        raw = await self._redis.hget(limit_keys(model)[3], "rate")
        rate = float(raw) if raw else None
        self._rates[model] = (rate, now)
        return rate

    async def release(self, lease: Lease, actual_tokens: int | None, answered: bool = False) -> None:
        """The call is over; `answered`: upstream answered it (it was admitted, not refused)."""
        keys = [key for scope in lease.scopes for key in limit_keys(scope)]
        actual = lease.tokens if actual_tokens is None else actual_tokens
        discovers = [int(scope != GLOBAL_SCOPE) for scope in lease.scopes]
        args: list[str | int] = [
            lease.id,
            lease.tokens,
            actual,
            int(time.time() * 1000),
            int(answered),
            int(CALLS_KEPT_S * 1000),
            *discovers,
        ]
        await self._release(keys=keys, args=args)

    async def penalize(self, model: str, lease: Lease, retry_after: float | None, source: str) -> float:
        """Upstream refused a call of `model` (granted under `lease`): every worker slows down.
        Returns the model's rate now (calls/s; 0 when it is not paced)."""
        state, recent, answered, refused = limit_keys(model)[3:7]
        discovers = self._settings.rate_discovery
        long_wait = bool(retry_after and retry_after > COOLDOWN_AFTER_S)
        cooldown = (retry_after or 1.0) if long_wait or not discovers else 0.0
        args: list[int | float | str] = [
            int(time.time() * 1000),
            lease.granted_ms,
            BETA,
            int(cooldown * 1000),
            source,
            int(DECREASE_GUARD_S * 1000),
            int((retry_after or 1.0) * 1000),
            MIN_SEED if discovers else 2**31,  # without discovery, never paced
            int(RATE_MEMORY_S * 1000),
            lease.id,
            NOISE_MIN,
            int(EPISODE_GAP_S * 1000),
            NOISE_Z,
            PROBE_RATIO,
            PROBE_DEPTH,
            PROBE_CALLS,
            int(CALLS_KEPT_S * 1000),
        ]
        return float(await self._penalize(keys=[state, recent, answered, refused], args=args))
