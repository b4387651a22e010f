"""The retry policy: which upstream failures are tried again, when, and which pause a batch."""

from __future__ import annotations

import random

import pytest

from routerq.core.jobs import JobError
from routerq.core.settings import Settings
from routerq.worker.execution.attempt import final_error
from routerq.worker.upstream.retry import (
    CAPACITY_BACKOFF_STEPS,
    Action,
    Tries,
    backoff,
    decide,
    error_class,
    refusal,
)

SETTINGS = Settings(ROUTERQ_MAX_ATTEMPTS=6, ROUTERQ_RETRY_BASE_DELAY=1.0, ROUTERQ_RETRY_MAX_DELAY=60.0)
NOW = 1_800_000_000.0


def at(attempt: int, waits: int = 0, since: float = NOW) -> Tries:
    return Tries(attempt, waits, since)


def error(status: int | None, code: str = "server_error") -> JobError:
    return JobError(code=code, message="upstream said no", status_code=status)


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_transient_statuses_are_retried_after_a_backoff(status: int) -> None:
    decision = decide(error(status), None, at(1), SETTINGS, NOW)
    assert decision.action is Action.RETRY
    assert 0.0 <= decision.delay <= SETTINGS.retry_base_delay


@pytest.mark.parametrize("code", ["timeout", "connection_error", "upstream_error"])
def test_timeouts_connection_errors_and_errors_inside_a_200_are_retried(code: str) -> None:
    assert decide(error(None, code), None, at(1), SETTINGS, NOW).action is Action.RETRY


@pytest.mark.parametrize("status", [400, 403, 404, 422])
def test_client_errors_fail_at_once_with_upstreams_message_unchanged(status: int) -> None:
    decision = decide(error(status, "invalid_request_error"), None, at(1), SETTINGS, NOW)
    assert decision.action is Action.FAIL and decision.reason == ""
    assert final_error(error(status), decision) == error(status)


def test_an_unusable_answer_is_not_paid_for_again() -> None:
    assert decide(error(502, "unusable_answer"), None, at(1), SETTINGS, NOW).action is Action.FAIL


def test_a_401_pauses_the_batch_instead_of_failing_lines() -> None:
    decision = decide(error(401, "authentication_error"), None, at(1), SETTINGS, NOW)
    assert decision.action is Action.PAUSE and "HTTP 401" in decision.reason


def test_a_402_without_retry_after_pauses_for_credit() -> None:
    decision = decide(error(402, "insufficient_credits"), None, at(1), SETTINGS, NOW)
    assert decision.action is Action.PAUSE and "HTTP 402" in decision.reason


def test_a_402_with_retry_after_is_waited_out() -> None:
    decision = decide(error(402, "insufficient_credits"), 7.0, at(1), SETTINGS, NOW)
    assert decision.action is Action.RETRY and decision.delay >= 7.0


def test_the_in_flight_budget_402_slows_down_without_pausing_or_using_an_attempt() -> None:
    refused = JobError(code="http_402", message="too many in flight", status_code=402,
                       metadata={"limit_source": "openrouter_in_flight_budget", "reason": "in_flight_budget_exhausted"})  # fmt: skip
    assert refusal(refused) == "in_flight"
    decision = decide(refused, 1.0, at(6), SETTINGS, NOW)  # even on the last attempt
    assert decision.action is Action.RETRY and decision.rate_limited and decision.delay >= 1.0


def test_a_providers_429_is_told_from_openrouters_own() -> None:
    provider = JobError(
        code="http_429", message="x", status_code=429, metadata={"provider_name": "DeepInfra"}
    )
    assert (refusal(provider), refusal(error(429)), refusal(error(402)), refusal(error(500))) == (
        "provider", "openrouter", None, None,
    )  # fmt: skip


def test_a_spent_budget_403_pauses_saying_until_when() -> None:
    spent = JobError(code="http_403", message="Budget limit exceeded", status_code=403, metadata={
        "limit_source": "openrouter_guardrail_budget", "scope": "guardrail", "resets_at": "2026-12-05T00:00:00Z",
    })  # fmt: skip
    decision = decide(spent, None, at(1), SETTINGS, NOW)
    assert decision.action is Action.PAUSE and "until 2026-12-05T00:00:00Z" in decision.reason
    assert decide(error(403, "moderation"), None, at(1), SETTINGS, NOW).action is Action.FAIL


def test_retry_after_is_a_floor_under_the_backoff() -> None:
    for attempt in range(1, 5):
        assert decide(error(503), 12.5, at(attempt), SETTINGS, NOW).delay >= 12.5
        assert decide(error(429, "rate_limit_exceeded"), 12.5, at(1, attempt), SETTINGS, NOW).delay >= 12.5


def test_the_last_attempt_fails_saying_the_budget_ran_out() -> None:
    decision = decide(error(502), None, at(6), SETTINGS, NOW)
    assert decision.action is Action.FAIL
    assert final_error(error(502), decision) == error(502).model_copy(
        update={"message": "upstream said no (gave up after 6 attempts)"}
    )


def test_a_503_retry_after_beyond_the_max_delay_fails_instead_of_outliving_the_visibility_timeout() -> None:
    decision = decide(error(503), 3600.0, at(1), SETTINGS, NOW)
    assert decision.action is Action.FAIL and "ROUTERQ_RETRY_MAX_DELAY" in decision.reason


def test_a_429_is_a_wait_that_never_uses_up_an_attempt() -> None:
    tries = at(6)  # the last attempt the budget allows
    for _ in range(50):
        decision = decide(error(429, "rate_limit_exceeded"), 1.0, tries, SETTINGS, NOW + 60)
        assert decision.action is Action.RETRY and decision.rate_limited and decision.delay >= 1.0
        tries = tries.after(decision)
    assert (tries.attempt, tries.waits) == (6, 50)
    assert decide(error(502), None, tries, SETTINGS, NOW + 60).action is Action.FAIL


def test_a_long_retry_after_on_a_429_is_waited_out_in_steps_the_visibility_timeout_allows() -> None:
    decision = decide(error(429, "rate_limit_exceeded"), 600.0, at(1), SETTINGS, NOW)
    assert decision.action is Action.RETRY and decision.delay == SETTINGS.retry_max_delay


def test_rate_limit_waits_end_after_the_max_retry_time_since_the_first_try() -> None:
    late = NOW + SETTINGS.max_retry_time - 0.5
    decision = decide(error(429, "rate_limit_exceeded"), 1.0, at(2, 40), SETTINGS, late)
    assert decision.action is Action.FAIL and "ROUTERQ_MAX_RETRY_TIME" in decision.reason


def test_tries_travel_through_a_message_and_start_their_clock_once() -> None:
    tries = Tries().started(NOW)
    assert Tries.load(tries.dump()) == tries and Tries.load(None) == Tries()
    assert tries.started(NOW + 5).since == NOW
    assert tries.waited(NOW + 5) == 5.0


def test_backoff_is_full_jitter_under_an_exponential_ceiling_capped_by_the_max_delay() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(SETTINGS.retry_max_delay, SETTINGS.retry_base_delay * 2 ** (attempt - 1))
        samples = [backoff(attempt, SETTINGS, rng) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8  # the whole range is used, not a fixed delay


def test_error_classes_name_rate_limits_and_auth_for_dashboards() -> None:
    assert error_class(error(429, "rate_limit_exceeded")) == "rate_limited"
    assert error_class(error(401, "authentication_error")) == "auth"
    assert error_class(error(None, "timeout")) == "timeout"


def test_a_line_refused_again_and_again_waits_its_retry_after_plus_at_most_a_few_seconds() -> None:
    for waits in (10, 50):
        delays = [
            decide(error(429, "rate_limit_exceeded"), 1.0, at(1, waits), SETTINGS, NOW).delay
            for _ in range(200)
        ]
        assert max(delays) <= max(1.0, SETTINGS.retry_base_delay * 2 ** (CAPACITY_BACKOFF_STEPS - 1))
        assert max(delays) > 2.0  # still a backoff, with jitter, beyond the floor
