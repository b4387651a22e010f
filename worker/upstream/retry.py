"""Retry policy: the one layer that decides whether an upstream failure is tried again, and when."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from routerq.core.jobs import JobError
from routerq.core.settings import Settings

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RETRYABLE_CODES = frozenset({"timeout", "connection_error", "upstream_error"})


class Action(StrEnum):
    RETRY = "retry"
    FAIL = "fail"
    PAUSE = "pause"  # the account, not the line, is the problem: stop the batch


@dataclass(frozen=True)
class Decision:
    action: Action
    delay: float = 0.0
    reason: str = ""  # why the policy gave up or paused; empty when the error says it all
    rate_limited: bool = False  # a wait for capacity: it does not use up an attempt


@dataclass(frozen=True)
class Tries:
    """Where a job stands: failed attempts count against ROUTERQ_MAX_ATTEMPTS; waits for rate limits
    (429s, the shared limiter) do not, and are bounded by ROUTERQ_MAX_RETRY_TIME since the first try."""

    attempt: int = 1
    waits: int = 0
    since: float = 0.0  # epoch seconds of the first try; 0 until it starts

    @classmethod
    def load(cls, raw: dict[str, float] | None) -> Tries:
        return (
            cls(int(raw.get("attempt", 1)), int(raw.get("waits", 0)), float(raw.get("since", 0)))
            if raw
            else cls()
        )

    def dump(self) -> dict[str, float]:
        return {"attempt": self.attempt, "waits": self.waits, "since": self.since}

    def started(self, now: float) -> Tries:
        return self if self.since else Tries(self.attempt, self.waits, now)

    def after(self, decision: Decision) -> Tries:
        """The tries of the message that carries the retry."""
        if decision.rate_limited:
            return Tries(self.attempt, self.waits + 1, self.since)
        return Tries(self.attempt + 1, self.waits, self.since)

    def waited(self, now: float) -> float:
        return now - self.since if self.since else 0.0


def error_class(error: JobError) -> str:
    """A short, stable name for dashboards: rate_limited, server_error, timeout, auth, ..."""
    if error.status_code == 429:
        return "rate_limited"
    if error.status_code in (401, 403) and error.code == "authentication_error":
        return "auth"
    return error.code


# A refused call's own backoff grows for this many waits, then stays (at the default base, up to 4 s
# on top of Retry-After): the shared limiter's pace, not each line's backoff, is what spares upstream,
# and a line a flaky provider happened to refuse five times should not wait 16-60 s for it (measured:
# such lines made a 3,000-line batch's last 50 s).
CAPACITY_BACKOFF_STEPS = 3


def backoff(attempt: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, base * 2^(attempt-1))]."""
    ceiling = min(settings.retry_max_delay, settings.retry_base_delay * 2 ** (attempt - 1))
    return (rng or random).uniform(0.0, ceiling)


def wait_for_capacity(delay: float, tries: Tries, settings: Settings, now: float) -> Decision:
    """A rate limit says wait: wait (at most ROUTERQ_RETRY_MAX_DELAY at a time, so a countdown never
    outlives the visibility timeout), unless the job has already waited ROUTERQ_MAX_RETRY_TIME."""
    delay = min(delay, settings.retry_max_delay)
    waited = tries.waited(now)
    if waited + delay > settings.max_retry_time:
        return Decision(
            Action.FAIL,
            reason=f"rate limited for {waited:.0f} s, longer than ROUTERQ_MAX_RETRY_TIME "
            f"({settings.max_retry_time:g} s)",
        )
    return Decision(Action.RETRY, delay=delay, rate_limited=True)


def refusal(error: JobError) -> str | None:
    """Who refused a call for capacity, when one did: a provider (a 429 naming it), OpenRouter itself
    (another 429), or OpenRouter's in-flight spending budget (a temporary 402). Each slows the model
    down (worker.upstream.limiter); none is the line's fault."""
    metadata = error.metadata or {}
    if error.status_code == 429:
        return "provider" if metadata.get("provider_name") else "openrouter"
    if error.status_code == 402 and "in_flight" in f"{metadata.get('limit_source')} {metadata.get('reason')}":
        return "in_flight"
    return None


def budget_pause(error: JobError) -> str | None:
    """A 403 for a spent budget (guardrail, workspace or key): why the batch pauses, and until when."""
    metadata = error.metadata or {}
    source = str(metadata.get("limit_source") or "")
    if error.status_code != 403 or not source.endswith(("_budget", "_key_limit")):
        return None
    resets = metadata.get("resets_at")
    until = f" until {resets}" if resets else ""
    return f"OpenRouter budget ({metadata.get('scope') or source}) spent{until}: {error.message}"


def decide(
    error: JobError, retry_after: float | None, tries: Tries, settings: Settings, now: float
) -> Decision:
    status = error.status_code
    if refusal(error) is not None:  # capacity, not the line: wait, never pause, attempts untouched
        return wait_for_capacity(
            max(backoff(min(tries.waits + 1, CAPACITY_BACKOFF_STEPS), settings), retry_after or 0.0),
            tries,
            settings,
            now,
        )
    attempt = tries.attempt
    budget = budget_pause(error)
    if budget is not None:
        return Decision(Action.PAUSE, reason=budget)
    if status == 401 or (status == 402 and retry_after is None):
        return Decision(Action.PAUSE, reason=f"HTTP {status}: {error.message}")
    retryable = (
        status in RETRYABLE_STATUS
        or error.code in RETRYABLE_CODES
        or (status == 402 and retry_after is not None)
    ) and error.code != "unusable_answer"
    if not retryable:
        return Decision(Action.FAIL)
    if attempt >= settings.max_attempts:
        return Decision(Action.FAIL, reason=f"gave up after {attempt} attempts")
    delay = max(backoff(attempt, settings), retry_after or 0.0)
    if delay > settings.retry_max_delay:
        return Decision(
            Action.FAIL,
            reason=f"upstream asks to wait {delay:.0f} s, more than ROUTERQ_RETRY_MAX_DELAY "
            f"({settings.retry_max_delay:g} s)",
        )
    return Decision(Action.RETRY, delay=delay)
