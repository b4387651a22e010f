"""Retry policy: the one layer that decides whether an upstream failure is tried again, and when."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from routerq.jobs import JobError
from routerq.settings import Settings

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


def error_class(error: JobError) -> str:
    """A short, stable name for dashboards: rate_limited, server_error, timeout, auth, ..."""
    if error.status_code == 429:
        return "rate_limited"
    if error.status_code in (401, 403) and error.code == "authentication_error":
        return "auth"
    return error.code


def backoff(attempt: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, base * 2^(attempt-1))]."""
    ceiling = min(settings.retry_max_delay, settings.retry_base_delay * 2 ** (attempt - 1))
    return (rng or random).uniform(0.0, ceiling)


def decide(error: JobError, retry_after: float | None, attempt: int, settings: Settings) -> Decision:
    status = error.status_code
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
