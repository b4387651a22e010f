"""Every branch of the batch scripts (routerq/core/lua/batch_*.lua) against a real redis-server: the gate a
line's call passes right before it starts, recording outcomes, parking and unparking, pausing."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from harness import on_redis

from routerq.core.batch_store import (
    AsyncBatchStore,
    Batch,
    BatchStatus,
    BatchStore,
    Go,
    Outcome,
    Recorded,
    batch_key,
)
from routerq.core.counters import COUNTERS_KEY, parse_counters
from routerq.core.jobs import Job, JobKind, JobResult, Usage
from routerq.core.upstream_batch import AsyncChunkStore

TTL = 3600
DELIVERY = "routerq:delivery:test"


def make_batch(client: redis.Redis, total: int = 3, batch_id: str = "batch_t", **fields: Any) -> str:
    batch = Batch(id=batch_id, status=BatchStatus.IN_PROGRESS, total=total, **fields)
    BatchStore(client, TTL).create(batch)
    return batch.id


def succeeded(cost: float = 0.5) -> JobResult:
    job = Job(id="j", kind=JobKind.CHAT, body={"model": "m", "messages": []}, enqueued_at=1.0)
    return JobResult(
        job_id=job.id, kind=job.kind, status="succeeded", usage=Usage(prompt_tokens=3, completion_tokens=4, cost=cost),
        started_at=2.0, finished_at=2.5, enqueued_at=1.0,
    )  # fmt: skip


def gate(url: str, batch_id: str, index: int = 0, delivery: str = DELIVERY) -> int:
    return on_redis(url, lambda client: AsyncBatchStore(client, TTL).go(batch_id, index, delivery))


def record(
    url: str, batch_id: str, index: int, outcome: Outcome, result: JobResult | None = None
) -> Recorded:
    line = {"custom_id": str(index)}
    return on_redis(
        url, lambda client: AsyncBatchStore(client, TTL).record(batch_id, index, outcome, line, result)
    )


def status(client: redis.Redis, batch_id: str) -> str:
    return (client.hget(batch_key(batch_id), "status") or b"").decode()


# --- the gate (batch_go.lua) ---


def test_the_gate_counts_each_delivery_of_a_running_batchs_line(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis)
    assert (gate(redis_url, batch_id)) == 1
    assert (gate(redis_url, batch_id)) == 2
    assert 0 < sync_redis.ttl(DELIVERY) <= 24 * 3600


def test_the_gate_says_missing_for_an_expired_batch(redis_url: str) -> None:
    assert (gate(redis_url, "batch_gone")) == Go.MISSING


def test_the_gate_stops_calls_of_a_cancelling_cancelled_or_failed_batch(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis)
    for stopped in (BatchStatus.CANCELLING, BatchStatus.CANCELLED, BatchStatus.FAILED):
        BatchStore(sync_redis, TTL).set_status(batch_id, stopped)
        assert (gate(redis_url, batch_id)) == Go.STOPPED
    assert not sync_redis.exists(DELIVERY)  # no call, no delivery counted


def test_the_gate_parks_a_line_of_a_paused_batch_off_the_running_set(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis)
    sync_redis.sadd(batch_key(batch_id, "run"), 1)
    BatchStore(sync_redis, TTL).set_status(batch_id, BatchStatus.PAUSED)
    assert (gate(redis_url, batch_id, 1)) == Go.PARKED
    assert sync_redis.smembers(batch_key(batch_id, "parked")) == {b"1"}
    assert sync_redis.smembers(batch_key(batch_id, "run")) == set()


def test_with_a_budget_the_first_call_goes_alone_until_one_line_has_a_cost(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, max_cost=1.0)
    assert (gate(redis_url, batch_id, 0)) == 1  # nobody holds a reservation: go
    assert (gate(redis_url, batch_id, 1, "routerq:delivery:other")) == Go.OVER_BUDGET
    assert (record(redis_url, batch_id, 0, Outcome.SUCCEEDED, succeeded(cost=0.25))) == Recorded.STORED
    assert sync_redis.hlen(batch_key(batch_id, "held")) == 0  # the record gave the reservation back
    assert (gate(redis_url, batch_id, 1, "routerq:delivery:other")) == 1


def test_with_a_budget_calls_hold_reservations_of_the_mean_cost_until_the_budget_is_held(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, total=10, max_cost=1.0)
    sync_redis.hset(batch_key(batch_id), mapping={"cost": 0.5, "succeeded": 2})  # 0.25 a line
    assert (gate(redis_url, batch_id, 2, "d:2")) == 1
    assert (gate(redis_url, batch_id, 3, "d:3")) == 1  # 0.5 + 0.25 + 0.25 = 1.0 fits
    assert (gate(redis_url, batch_id, 4, "d:4")) == Go.OVER_BUDGET
    assert float(sync_redis.hget(batch_key(batch_id), "reserved") or 0) == 0.5
    assert (gate(redis_url, batch_id, 2, "d:2")) == 2  # a retry of a holder re-reserves its own


def test_with_the_budget_spent_no_call_starts(redis_url: str, sync_redis: redis.Redis) -> None:
    batch_id = make_batch(sync_redis, max_cost=1.0)
    sync_redis.hset(batch_key(batch_id), mapping={"cost": 1.0, "succeeded": 4})
    assert (gate(redis_url, batch_id)) == Go.OVER_BUDGET


# --- recording outcomes (batch_record.lua) ---


def test_recording_counts_usage_latency_and_ends_the_batch_with_its_last_line(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, total=2)
    sync_redis.sadd(batch_key(batch_id, "run"), 0, 1)
    assert (record(redis_url, batch_id, 0, Outcome.SUCCEEDED, succeeded())) == Recorded.STORED
    assert (record(redis_url, batch_id, 1, Outcome.FAILED)) == Recorded.ENDED_BATCH
    batch = BatchStore(sync_redis, TTL).get(batch_id)
    assert batch is not None
    assert (batch.status, batch.succeeded, batch.failed, batch.running) == (BatchStatus.COMPLETED, 1, 1, 0)
    assert (batch.prompt_tokens, batch.completion_tokens, batch.cost) == (3, 4, 0.5)
    assert BatchStore(sync_redis, TTL).stats(batch_id).lines == 1


def test_a_redelivered_outcome_is_recorded_once_and_a_success_is_never_overwritten(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, total=3)
    assert (record(redis_url, batch_id, 0, Outcome.SUCCEEDED, succeeded())) == Recorded.STORED
    assert (record(redis_url, batch_id, 0, Outcome.SUCCEEDED, succeeded())) == Recorded.ALREADY
    assert (record(redis_url, batch_id, 0, Outcome.FAILED)) == Recorded.ALREADY
    batch = BatchStore(sync_redis, TTL).get(batch_id)
    assert batch is not None and (batch.succeeded, batch.failed, batch.cost) == (1, 0, 0.5)
    assert parse_counters(sync_redis.hgetall(COUNTERS_KEY)) == {
        "lines:live:succeeded": 1, "prompt_tokens": 3, "completion_tokens": 4, "cost": 0.5,
    }  # fmt: skip


def test_a_failed_line_that_later_succeeds_moves_from_failed_to_succeeded(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, total=3)
    (record(redis_url, batch_id, 0, Outcome.FAILED))
    assert (record(redis_url, batch_id, 0, Outcome.SUCCEEDED, succeeded())) == Recorded.STORED
    batch = BatchStore(sync_redis, TTL).get(batch_id)
    assert batch is not None and (batch.succeeded, batch.failed) == (1, 0)


def test_recording_into_an_expired_batch_stores_nothing(redis_url: str, sync_redis: redis.Redis) -> None:
    assert (record(redis_url, "batch_gone", 0, Outcome.FAILED)) == Recorded.NO_BATCH
    assert not sync_redis.exists(batch_key("batch_gone", "out"))


def test_the_spend_reaching_the_budget_pauses_the_batch(redis_url: str, sync_redis: redis.Redis) -> None:
    batch_id = make_batch(sync_redis, total=5, max_cost=0.5)
    (record(redis_url, batch_id, 0, Outcome.SUCCEEDED, succeeded(cost=0.5)))
    assert status(sync_redis, batch_id) == "paused"
    assert b"budget" in (sync_redis.hget(batch_key(batch_id), "reason") or b"")


def test_the_last_outcome_of_a_cancelling_batch_makes_it_cancelled(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, total=1)
    BatchStore(sync_redis, TTL).set_status(batch_id, BatchStatus.CANCELLING)
    assert (record(redis_url, batch_id, 0, Outcome.CANCELLED)) == Recorded.ENDED_BATCH
    assert status(sync_redis, batch_id) == "cancelled"
    assert sync_redis.hget(batch_key(batch_id), "cancelled_at")


# --- park, unpark, pause, unmark ---


def test_a_line_is_parked_only_while_its_batch_is_paused(redis_url: str, sync_redis: redis.Redis) -> None:
    batch_id = make_batch(sync_redis)

    def park(index: int) -> bool:
        return on_redis(redis_url, lambda client: AsyncBatchStore(client, TTL).park(batch_id, index))

    assert park(0) is False  # running again: the line runs
    BatchStore(sync_redis, TTL).set_status(batch_id, BatchStatus.PAUSED)
    assert park(0) is True
    assert BatchStore(sync_redis, TTL).unpark(batch_id, BatchStatus.IN_PROGRESS) == [0]
    assert status(sync_redis, batch_id) == "in_progress"
    assert not sync_redis.exists(batch_key(batch_id, "parked"))


def test_unparking_a_batch_that_is_not_paused_changes_nothing(sync_redis: redis.Redis) -> None:
    batch_id = make_batch(sync_redis)
    assert BatchStore(sync_redis, TTL).unpark(batch_id, BatchStatus.CANCELLED, cancelled_at=5.0) is None
    assert status(sync_redis, batch_id) == "in_progress"


def test_unparking_to_cancel_stamps_the_field_and_drops_the_reason(sync_redis: redis.Redis) -> None:
    batch_id = make_batch(sync_redis)
    sync_redis.hset(batch_key(batch_id), mapping={"status": "paused", "reason": "no credits"})
    sync_redis.sadd(batch_key(batch_id, "parked"), 2, 1)
    assert BatchStore(sync_redis, TTL).unpark(batch_id, BatchStatus.CANCELLING, cancelled_at=5.0) == [1, 2]
    fields = sync_redis.hgetall(batch_key(batch_id))
    assert (fields[b"status"], fields[b"cancelled_at"], b"reason" in fields) == (b"cancelling", b"5.0", False)


def test_only_a_running_batch_is_paused_and_the_first_reason_is_kept(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis)

    def pause(reason: str) -> bool:
        return on_redis(redis_url, lambda client: AsyncBatchStore(client, TTL).pause(batch_id, reason))

    assert pause("key revoked") is True
    assert pause("no credits") is False
    assert sync_redis.hget(batch_key(batch_id), "reason") == b"key revoked"


def test_unmarking_a_line_takes_it_off_the_running_set_and_gives_back_its_reservation(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, max_cost=1.0)
    sync_redis.sadd(batch_key(batch_id, "run"), 0)
    assert (gate(redis_url, batch_id, 0)) == 1
    assert sync_redis.hlen(batch_key(batch_id, "held")) == 1

    on_redis(redis_url, lambda client: AsyncBatchStore(client, TTL).unmark_running(batch_id, 0))
    assert sync_redis.scard(batch_key(batch_id, "run")) == 0
    assert sync_redis.hlen(batch_key(batch_id, "held")) == 0
    assert sync_redis.hget(batch_key(batch_id), "reserved") is None


def test_running_counts_lines_calling_upstream_and_held_the_lines_a_worker_took_but_has_not_called(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    """A message of 16 lines is taken at once; `status` said "88 running" at --concurrency 8."""
    batch_id = make_batch(sync_redis, total=4)
    sync_redis.sadd(batch_key(batch_id, "run"), 0, 1, 2, 3)  # a worker took a message of four lines
    assert (gate(redis_url, batch_id, 0, "d:0")) == 1  # one of them got a call slot
    batch = BatchStore(sync_redis, TTL).get(batch_id)
    assert batch is not None and (batch.running, batch.held, batch.queued) == (1, 3, 0)
    (record(redis_url, batch_id, 0, Outcome.SUCCEEDED, succeeded()))
    batch = BatchStore(sync_redis, TTL).get(batch_id)
    assert batch is not None and (batch.running, batch.held, batch.succeeded) == (0, 3, 1)


# --- an upstream batch's share of the budget (batch_reserve.lua, batch_unreserve.lua) ---


def reserve(url: str, batch_id: str, estimate: float | None, lines: int, chunk: str = "c1") -> int:
    return on_redis(
        url, lambda client: AsyncChunkStore(client, TTL).reserve(batch_id, chunk, estimate, lines)
    )


def unreserve(url: str, batch_id: str, chunk: str = "c1") -> None:
    on_redis(url, lambda client: AsyncChunkStore(client, TTL).unreserve(batch_id, chunk))


def reserved(client: redis.Redis, batch_id: str) -> float:
    return float(client.hget(batch_key(batch_id), "reserved") or 0)


def test_without_a_budget_an_upstream_batch_sends_every_line_and_reserves_nothing(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, total=500)
    assert reserve(redis_url, batch_id, 0.01, 500) == 500
    assert reserved(sync_redis, batch_id) == 0


def test_an_upstream_batch_of_a_stopped_paused_or_expired_batch_is_not_sent(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    assert reserve(redis_url, "batch_gone", 0.01, 5) == Go.MISSING
    batch_id = make_batch(sync_redis, max_cost=1.0)
    BatchStore(sync_redis, TTL).set_status(batch_id, BatchStatus.PAUSED)
    assert reserve(redis_url, batch_id, 0.01, 5) == Go.PARKED
    BatchStore(sync_redis, TTL).set_status(batch_id, BatchStatus.CANCELLING)
    assert reserve(redis_url, batch_id, 0.01, 5) == Go.STOPPED


def test_with_a_budget_an_upstream_batch_sends_the_lines_whose_estimate_fits_and_reserves_it(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, total=100, max_cost=1.0, cost=0.25)
    assert reserve(redis_url, batch_id, 0.1, 100) == 7  # 0.75 of room at 0.1 a line
    assert reserved(sync_redis, batch_id) == pytest.approx(0.7)
    assert reserve(redis_url, batch_id, 0.1, 100) == 7  # asked again (a redelivery): the same answer
    assert reserved(sync_redis, batch_id) == pytest.approx(0.7)
    assert reserve(redis_url, batch_id, 0.1, 93, chunk="c2") == Go.OVER_BUDGET  # c1 holds the rest
    unreserve(redis_url, batch_id)
    assert reserved(sync_redis, batch_id) == 0 and sync_redis.hlen(batch_key(batch_id, "held")) == 0
    assert reserve(redis_url, batch_id, 0.1, 93, chunk="c2") == 7


def test_an_upstream_batch_whose_first_line_does_not_fit_sends_it_alone_when_nothing_else_is_out(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, total=10, max_cost=1.0, cost=0.95)
    assert reserve(redis_url, batch_id, 0.1, 10) == 1  # the budget passes by at most about one line
    assert reserve(redis_url, batch_id, 0.1, 9, chunk="c2") == Go.OVER_BUDGET


def test_an_unknown_estimate_sends_one_line_alone_to_learn_the_price(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, total=10, max_cost=1.0)
    assert reserve(redis_url, batch_id, None, 10) == 1
    assert reserve(redis_url, batch_id, None, 9, chunk="c2") == Go.OVER_BUDGET
    free = make_batch(sync_redis, total=10, batch_id="batch_free", max_cost=1.0)
    assert reserve(redis_url, free, 0.0, 10) == 10  # a free model: every line fits


def test_an_upstream_batch_finding_the_budget_spent_pauses_the_batch(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, total=10, max_cost=1.0, cost=1.0)
    assert reserve(redis_url, batch_id, 0.1, 10) == Go.PARKED
    assert status(sync_redis, batch_id) == "paused"
    assert "budget of $1 reached" in (sync_redis.hget(batch_key(batch_id), "reason") or b"").decode()
