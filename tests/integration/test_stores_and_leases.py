"""The other scripts against a real redis-server: embedding claims, single-job results, staged release,
the shared limiter, and the lease sweep that puts back a dead worker's messages."""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio as aredis
from harness import on_redis, run, settings_for

from routerq.api.file_store import SWEEP_IDLE_S, FileStore, StoredFile, new_file_id
from routerq.core.counters import COUNTERS_KEY, parse_counters
from routerq.core.embed_store import AsyncEmbedStore, EmbedRun, EmbedStore, embed_key
from routerq.core.jobs import JobKind, JobResult
from routerq.core.rate_state import limit_keys
from routerq.core.result_store import PENDING_KEY, RESULT_KEY, AsyncResultStore
from routerq.core.staged_enqueue import StagedEnqueue
from routerq.worker.execution.holdings import Holdings
from routerq.worker.upkeep.leases import UNACKED_INDEX_KEY, UNACKED_KEY, LeaseKeeper
from routerq.worker.upstream.limiter import EPISODE_GAP_S, INCREASE_S, INCREASE_STEP, Lease, SharedLimiter
from routerq.worker.upstream.pace_waiters import IN_PLACE_S, PaceWaiters

TTL = 3600


# --- embedding claims (embed_claim.lua) ---


def claim(url: str, indexes: list[int], owner: str, claim_s: float = 60) -> list[int]:
    return on_redis(
        url, lambda client: AsyncEmbedStore(client, TTL, claim_s=claim_s).claim("run1", indexes, owner)
    )


def test_a_text_with_a_vector_is_never_claimed(redis_url: str, sync_redis: redis.Redis) -> None:
    sync_redis.hset(embed_key("run1", "vec"), "1", b"\0\0\0\0")
    assert (claim(redis_url, [0, 1, 2], "req-a")) == [0, 2]


def test_a_text_held_by_a_live_claim_of_another_request_is_not_taken(redis_url: str) -> None:
    assert (claim(redis_url, [0, 1], "req-a")) == [0, 1]
    assert (claim(redis_url, [0, 1, 2], "req-b")) == [2]


def test_the_request_holding_a_claim_may_take_it_again(redis_url: str) -> None:
    assert (claim(redis_url, [0, 1], "req-a")) == [0, 1]
    assert (claim(redis_url, [0, 1], "req-a")) == [0, 1]  # its retry, or its redelivery


def test_an_expired_claim_is_taken_by_another_request(redis_url: str, sync_redis: redis.Redis) -> None:
    past = int(time.time()) - 1
    sync_redis.hset(embed_key("run1", "claim"), "0", f"{past} req-dead")
    assert (claim(redis_url, [0], "req-b")) == [0]


def test_a_failed_request_lets_go_of_its_texts(redis_url: str, sync_redis: redis.Redis) -> None:
    async def fail_then_claim(client: aredis.Redis) -> list[int]:
        store = AsyncEmbedStore(client, TTL, claim_s=60)
        await store.claim("run1", [0, 1], "req-a")
        await store.record_failure("run1", [0, 1])
        return await store.claim("run1", [0, 1], "req-b")

    assert on_redis(redis_url, fail_then_claim) == [0, 1]
    assert sync_redis.hget(embed_key("run1"), "failed") == b"2"


# --- embedding vectors and counts (embed_store.lua, embed_recount.lua) ---


def test_vectors_are_counted_with_the_store_and_a_stored_text_is_never_counted_twice(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    async def store_twice(client: aredis.Redis) -> tuple[int, int]:
        store = AsyncEmbedStore(client, TTL, claim_s=60)
        await store.claim("run1", [0, 1, 2], "req-a")
        first = await store.store_vectors("run1", {0: b"\0\1", 1: b"\2\3"}, tokens=10, cost=0.5)
        again = await store.store_vectors("run1", {1: b"\7\7", 2: b"\4\5"}, tokens=7, cost=0.25)
        return first, again

    assert on_redis(redis_url, store_twice) == (2, 1)
    run = {k.decode(): v.decode() for k, v in sync_redis.hgetall(embed_key("run1")).items()}
    assert (run["done"], run["prompt_tokens"], float(run["cost"])) == ("3", "17", 0.75)
    assert sync_redis.hget(embed_key("run1", "vec"), "1") == b"\2\3"  # the first vector stays
    assert not sync_redis.exists(embed_key("run1", "claim"))
    assert parse_counters(sync_redis.hgetall(COUNTERS_KEY))["texts:embedded"] == 3


def test_a_request_whose_texts_all_have_vectors_counts_nothing(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    sync_redis.hset(embed_key("run1", "vec"), "0", b"\0")
    stored = on_redis(
        redis_url,
        lambda client: AsyncEmbedStore(client, TTL, claim_s=60).store_vectors("run1", {0: b"\1"}, 5, 0.1),
    )
    assert stored == 0
    assert sync_redis.hget(embed_key("run1"), "prompt_tokens") is None


def test_a_rerun_counts_as_done_exactly_the_texts_with_vectors(sync_redis: redis.Redis) -> None:
    """A worker killed mid-store by an older routerq, or a counter lost: the re-run's count is the truth,
    so it ends when every text has its vector."""
    sync_redis.hset(embed_key("run1", "vec"), mapping={"0": b"\0", "1": b"\1", "2": b"\2"})
    sync_redis.hset(embed_key("run1"), mapping={"done": 1, "failed": 2})
    EmbedStore(sync_redis, TTL).save(EmbedRun(id="run1", model="m", total=5))
    assert sync_redis.hmget(embed_key("run1"), ["done", "failed", "total"]) == [b"3", b"0", b"5"]


# --- single-job results (result_put.lua) ---


def result(status: str) -> JobResult:
    return JobResult(
        job_id="job1",
        kind=JobKind.CHAT,
        status=status,
        enqueued_at=1.0,
        started_at=2.0,
        finished_at=3.0,  # type: ignore[arg-type]
    )


def put(url: str, outcome: JobResult) -> bool:
    return on_redis(url, lambda client: AsyncResultStore(client, TTL, "routerq").put(outcome))


def test_a_stored_result_ends_the_pending_job_and_wakes_its_waiter(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    pending = PENDING_KEY.format(queue="routerq")
    sync_redis.zadd(pending, {"job1": 1.0})
    assert (put(redis_url, result("succeeded"))) is True
    assert json.loads(sync_redis.get(RESULT_KEY.format(job_id="job1")) or b"{}")["status"] == "succeeded"
    assert sync_redis.zscore(pending, "job1") is None
    assert sync_redis.blpop(["routerq:job:job1:done"], timeout=1) is not None


def test_a_later_failure_never_overwrites_a_success(redis_url: str, sync_redis: redis.Redis) -> None:
    assert (put(redis_url, result("succeeded"))) is True
    assert (put(redis_url, result("failed"))) is False
    assert json.loads(sync_redis.get(RESULT_KEY.format(job_id="job1")) or b"{}")["status"] == "succeeded"


def test_a_success_replaces_an_earlier_failure(redis_url: str, sync_redis: redis.Redis) -> None:
    assert (put(redis_url, result("failed"))) is True
    assert (put(redis_url, result("succeeded"))) is True
    assert json.loads(sync_redis.get(RESULT_KEY.format(job_id="job1")) or b"{}")["status"] == "succeeded"


def test_each_status_a_job_reaches_is_counted_once_for_metrics(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    for status in ("failed", "failed", "succeeded", "succeeded", "failed"):  # redeliveries
        put(redis_url, result(status))
    counters = parse_counters(sync_redis.hgetall(COUNTERS_KEY))
    assert (counters["jobs:failed"], counters["jobs:succeeded"]) == (1, 1)


# --- staged enqueue (staged_release.lua) ---


def test_staged_messages_reach_the_queue_together_in_order_with_the_owner_in_progress(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    settings = settings_for(redis_url)
    staged = StagedEnqueue(sync_redis, settings, "routerq:batch:b1")
    for i in range(3):
        staged.add("routerq.run_line", ["b1", [i], 1.0])
    assert sync_redis.llen(settings.queue) == 0  # nothing is visible before the release
    assert staged.release(watch=("routerq:active:routerq", "b1")) == 3
    bodies = [json.loads(m)["headers"]["argsrepr"] for m in sync_redis.lrange(settings.queue, 0, -1)]
    assert len(bodies) == 3
    assert sync_redis.hget("routerq:batch:b1", "status") == b"in_progress"
    assert sync_redis.smembers("routerq:active:routerq") == {b"b1"}
    assert not sync_redis.exists("routerq:batch:b1:staging")


def test_a_release_without_start_leaves_the_owner_as_it_was(redis_url: str, sync_redis: redis.Redis) -> None:
    staged = StagedEnqueue(sync_redis, settings_for(redis_url), "routerq:embed:e1")
    staged.add("routerq.run_embed", ["e1", [0], 1.0])
    assert staged.release(start=False) == 1
    assert sync_redis.hget("routerq:embed:e1", "status") is None


# --- the shared limiter (limiter_*.lua) ---


def test_the_limiter_grants_up_to_the_rpm_then_says_how_long_to_wait(redis_url: str) -> None:
    settings = settings_for(redis_url, ROUTERQ_RATE_LIMIT_REQUESTS="2")

    async def three(client: aredis.Redis) -> list[float]:
        limiter = SharedLimiter(client, settings)
        waits = []
        for _ in range(3):
            lease, wait = await limiter.try_acquire("m", 10)
            waits.append(wait if lease is None else 0.0)
        return waits

    first, second, third = on_redis(redis_url, three)
    assert (first, second) == (0.0, 0.0)
    assert 50 < third <= settings.rate_limit_window + 1


def grants(limiter: SharedLimiter, model: str, n: int) -> list[Lease | None]:
    async def take() -> list[Lease | None]:
        return [(await limiter.try_acquire(model, 10))[0] for _ in range(n)]

    return run(take)


def test_without_discovery_a_429_makes_every_worker_wait_its_retry_after_and_paces_nothing(
    redis_url: str,
) -> None:
    settings = settings_for(redis_url, ROUTERQ_RATE_DISCOVERY="false")

    async def refused(client: aredis.Redis) -> tuple[float, float]:
        limiter = SharedLimiter(client, settings)
        leases = [(await limiter.try_acquire("m", 10))[0] for _ in range(50)]
        rate = await limiter.penalize("m", leases[-1], 2.0, "provider")  # type: ignore[arg-type]
        return rate, (await SharedLimiter(client, settings).try_acquire("m", 10))[1]

    rate, wait = on_redis(redis_url, refused)
    assert rate == 0.0 and 1.0 < wait <= 2.0


def test_a_model_is_not_paced_until_upstream_refuses_one_of_its_calls(redis_url: str) -> None:
    async def many(client: aredis.Redis) -> list[float]:
        limiter = SharedLimiter(client, settings_for(redis_url))
        return [(await limiter.try_acquire("m", 10))[1] for _ in range(300)]

    assert set(on_redis(redis_url, many)) == {0.0}


def test_the_first_refusal_paces_the_model_for_every_worker_at_beta_of_last_seconds_grants(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    settings = settings_for(redis_url)

    async def refused_then_other_worker() -> tuple[float, float, float]:
        a, b = aredis.Redis.from_url(redis_url), aredis.Redis.from_url(redis_url)
        try:
            mine, other = SharedLimiter(a, settings), SharedLimiter(b, settings)
            leases = [(await mine.try_acquire("m", 10))[0] for _ in range(101)]
            assert all(leases)
            # upstream refused the 101st: it had admitted the 100 granted in the second before it
            rate = await mine.penalize("m", leases[-1], 1.0, "provider")  # type: ignore[arg-type]
            again = await mine.penalize("m", leases[0], 1.0, "provider")  # sent before the cut
            _, wait = await other.try_acquire("m", 10)  # 101 granted this second: over 90/s
            return rate, again, wait
        finally:
            await a.aclose()
            await b.aclose()

    rate, again, wait = run(refused_then_other_worker)
    assert rate == again == pytest.approx(90.0)  # one cut per congestion
    assert 0 < wait <= 1.0
    state = sync_redis.hgetall("routerq:limit:{m}:state")
    assert (int(state[b"refused"]), int(state[b"refused:provider"]), int(state[b"granted"])) == (2, 2, 101)
    # the first refusal also stops the model for its Retry-After: upstream's window is full of the burst
    assert 0 < int(state[b"cooldown"]) - int(state[b"refused_at"]) <= 1000


def press_rates(redis_url: str, sync_redis: redis.Redis, quiet_ms: int) -> list[float]:
    """Model "m" at 50/s, its last refusal `quiet_ms` ago: the rate after each of three presses,
    INCREASE_S apart."""
    refused_at = int(time.time() * 1000) - quiet_ms
    sync_redis.hset("routerq:limit:{m}:state", mapping={"rate": "50", "refused_at": str(refused_at)})

    async def press(client: aredis.Redis) -> list[float]:
        limiter = SharedLimiter(client, settings_for(redis_url))
        rates = []
        for _ in range(3):
            while (await limiter.try_acquire("m", 10))[0] is not None:
                pass
            rates.append(float(await client.hget("routerq:limit:{m}:state", "rate") or 0))
            await asyncio.sleep(INCREASE_S)
        return rates

    return on_redis(redis_url, press)


def test_callers_pressing_the_rate_raise_it_a_step_at_a_time(redis_url: str, sync_redis: redis.Redis) -> None:
    rates = press_rates(redis_url, sync_redis, 300)
    steps = [after / before - 1 for before, after in zip([50.0, *rates], rates, strict=False)]
    assert all(0.02 <= step < 0.03 for step in steps), steps  # 2 %, a little more as the quiet lasts


def test_the_rate_grows_faster_the_longer_upstream_refuses_nothing(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    assert press_rates(redis_url, sync_redis, 60_000)[0] == pytest.approx(50 * (1 + 5 * INCREASE_STEP))


def test_a_paced_models_grants_are_spaced_evenly_at_its_rate(redis_url: str, sync_redis: redis.Redis) -> None:
    """At 10/s, a call 100 ms after the last; one more may come up to 0.1 s ahead of its turn."""
    sync_redis.hset("routerq:limit:{m}:state", mapping={"rate": "10", "hold": str(2**50)})  # no increase

    async def callers(client: aredis.Redis) -> tuple[list[bool], float, bool]:
        limiter = SharedLimiter(client, settings_for(redis_url))
        outcomes = [await limiter.try_acquire("m", 10) for _ in range(4)]
        await asyncio.sleep(outcomes[-1][1])
        return (
            [lease is not None for lease, _ in outcomes],
            outcomes[-1][1],
            (await limiter.try_acquire("m", 10))[0] is not None,
        )

    granted, wait, after = on_redis(redis_url, callers)
    assert granted == [True, True, False, False] and 0.08 <= wait <= 0.1 and after


def test_a_refusal_amid_a_trickle_of_calls_does_not_pace_the_model(redis_url: str) -> None:
    async def trickle(client: aredis.Redis) -> tuple[float, float]:
        limiter = SharedLimiter(client, settings_for(redis_url))
        lease, _ = await limiter.try_acquire("quiet", 10)
        assert lease is not None
        rate = await limiter.penalize("quiet", lease, 1.0, "provider")
        return rate, (await limiter.try_acquire("quiet", 10))[1]

    assert on_redis(redis_url, trickle) == (0.0, 0.0)


def test_a_long_retry_after_stops_every_call_of_the_model_until_it_ends(redis_url: str) -> None:
    async def cooled(client: aredis.Redis) -> tuple[float, float]:
        limiter = SharedLimiter(client, settings_for(redis_url))
        lease, _ = await limiter.try_acquire("free-model", 10)
        assert lease is not None
        await limiter.penalize("free-model", lease, 30.0, "openrouter")
        _, wait = await limiter.try_acquire("free-model", 10)
        _, other = await limiter.try_acquire("another-model", 10)
        return wait, other

    wait, other = on_redis(redis_url, cooled)
    assert 25 < wait <= 30 and other == 0.0


def paced_last_second(
    redis_url: str, sync_redis: redis.Redis, state: dict[str, float], answered: int, refused: int
) -> dict[bytes, bytes]:
    """Model "m" paced with `state` (a field `x_ago`: `x` that many ms before now; `decreased` a minute
    ago unless said): `answered` calls answered and `refused` refused in the last second (all but the
    last granted before the last cut: counted, not acted on), then the state the last refusal left."""
    now = int(time.time() * 1000)
    fields = {"decreased": str(now - 60_000)}
    for name, value in state.items():
        fields[name.removesuffix("_ago")] = str(now - int(value) if name.endswith("_ago") else value)
    sync_redis.hset(limit_keys("m")[3], mapping=fields)

    async def outcomes(client: aredis.Redis) -> None:
        limiter = SharedLimiter(client, settings_for(redis_url))
        scopes, total = ("*", "m"), answered + refused - 1
        for n in range(total):  # the refusals spread evenly among the answers, as upstream sends them
            if (n + 1) * (refused - 1) // total > n * (refused - 1) // total:
                await limiter.penalize("m", Lease(f"old-{n}", scopes, 10, 0), 1.0, "provider")
                continue
            # an unpaced model's grants seed its rate; a paced one's would press it (and raise it)
            lease = None if "rate" in state else (await limiter.try_acquire("m", 10))[0]
            await limiter.release(lease or Lease(f"ok-{n}", scopes, 10, 0), 10, answered=True)
        await limiter.penalize("m", Lease("last", scopes, 10, int(time.time() * 1000)), 1.0, "provider")

    on_redis(redis_url, outcomes)
    return sync_redis.hgetall(limit_keys("m")[3])


def test_refusals_within_the_models_noise_neither_cut_its_rate_nor_hold_its_increase(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    state = paced_last_second(redis_url, sync_redis, {"rate": 50, "noise": 0.25, "refused_at": 0}, 30, 10)
    assert (float(state[b"rate"]), state[b"refused_at"], state[b"refused"]) == (50.0, b"0", b"10")


def test_refusals_beyond_the_models_noise_cut_its_rate(redis_url: str, sync_redis: redis.Redis) -> None:
    state = paced_last_second(redis_url, sync_redis, {"rate": 50, "noise": 0.05}, 30, 20)
    assert float(state[b"rate"]) == pytest.approx(45.0)


def test_a_cut_starts_from_what_upstream_answered_when_it_refused_most_calls(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    state = paced_last_second(redis_url, sync_redis, {"rate": 70}, 40, 60)  # its limit fell
    assert float(state[b"rate"]) == pytest.approx(40 * 0.9)
    assert float(state[b"episode_rate"]) == pytest.approx(40 * 0.9)  # a new episode starts there


def test_a_cut_from_what_upstream_answered_is_never_below_half_the_rate(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    state = paced_last_second(redis_url, sync_redis, {"rate": 100}, 20, 60)
    assert float(state[b"rate"]) == pytest.approx(50 * 0.9)


def test_most_of_a_few_calls_refused_is_chance_and_cut_by_a_step(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    state = paced_last_second(redis_url, sync_redis, {"rate": 20}, 8, 12)
    assert float(state[b"rate"]) == pytest.approx(18.0)


EPISODE = {"episode_rate": 50, "episode_share": 0.25, "decreased_ago": 1500}


def test_cuts_that_did_not_lower_the_refused_share_unpace_the_model_and_the_share_becomes_its_noise(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    state = paced_last_second(redis_url, sync_redis, {**EPISODE, "rate": 36.45}, 30, 10)  # still 25 %
    assert b"rate" not in state and 0.25 <= float(state[b"noise"]) <= 0.35  # its share, one standard error up


def test_refusals_within_an_unpaced_models_noise_do_not_pace_it(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    state = paced_last_second(redis_url, sync_redis, {"noise": 0.25}, 30, 10)
    assert b"rate" not in state and b"cooldown" not in state


def test_refusals_beyond_an_unpaced_models_noise_pace_it_again(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    state = paced_last_second(redis_url, sync_redis, {"noise": 0.05}, 30, 20)
    assert float(state[b"rate"]) == pytest.approx(0.9 * 29)  # the grants of the second before, less itself


def test_cuts_that_lowered_the_refused_share_are_a_limit(redis_url: str, sync_redis: redis.Redis) -> None:
    episode = {**EPISODE, "rate": 36.45, "episode_share": 0.39, "noise": 0.02}
    state = paced_last_second(redis_url, sync_redis, episode, 35, 5)  # 39 % fell to 12 %: over the noise
    assert b"noise" not in state and b"episode_rate" not in state  # the next congestion starts an episode
    assert float(state[b"rate"]) == 36.45  # a verdict is no cut


def test_a_probe_at_its_depth_is_cut_no_more_until_enough_calls_give_its_verdict(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    state = paced_last_second(redis_url, sync_redis, {**EPISODE, "rate": 36.45}, 10, 5)  # 15 calls
    assert float(state[b"rate"]) == 36.45 and b"noise" not in state and b"hold" in state


def test_a_cut_above_the_probe_depth_gives_no_verdict(redis_url: str, sync_redis: redis.Redis) -> None:
    state = paced_last_second(redis_url, sync_redis, {**EPISODE, "rate": 45}, 40, 10)
    assert float(state[b"rate"]) == pytest.approx(40.5) and b"noise" not in state


def test_a_refusal_long_after_the_last_cut_starts_a_new_episode(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    state = paced_last_second(
        redis_url, sync_redis, {**EPISODE, "rate": 36.45, "decreased_ago": 10_000}, 30, 10
    )
    assert float(state[b"rate"]) == pytest.approx(36.45 * 0.9) and b"noise" not in state
    assert float(state[b"episode_rate"]) == 36.45


def test_a_probe_holds_the_rate_from_growing_between_its_cuts(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    state = paced_last_second(redis_url, sync_redis, {**EPISODE, "rate": 45}, 40, 10)  # its second cut
    assert int(state[b"hold"]) - int(state[b"decreased"]) == EPISODE_GAP_S * 1000
    key = limit_keys("m")[3]
    sync_redis.hset(key, "refused_at", int(time.time() * 1000) - 300)  # none since: only the hold keeps it

    async def press(client: aredis.Redis) -> float:
        limiter = SharedLimiter(client, settings_for(redis_url))
        while (await limiter.try_acquire("m", 1))[0] is not None:
            pass
        return float(await client.hget(key, "rate") or 0)

    assert on_redis(redis_url, press) == pytest.approx(40.5)
    sync_redis.hdel(key, "hold")
    assert on_redis(redis_url, press) == pytest.approx(
        40.5 * (1 + 2 * INCREASE_STEP), rel=0.005
    )  # recovering


def test_after_a_cut_the_rate_grows_twice_the_step_until_near_where_the_cut_began(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    sync_redis.hset(limit_keys("m")[3], "cut_from", 53)  # 50 is under 0.95 of it
    recovering = press_rates(redis_url, sync_redis, 300)[0]
    sync_redis.hset(limit_keys("m")[3], "cut_from", 52)  # 50 is within 5 % of it
    assert (recovering, press_rates(redis_url, sync_redis, 300)[0]) == pytest.approx((52.0, 51.0), rel=0.003)


def test_a_limit_that_fell_far_is_no_probe_and_holds_nothing(redis_url: str, sync_redis: redis.Redis) -> None:
    state = paced_last_second(redis_url, sync_redis, {**EPISODE, "rate": 45, "episode_share": 0.5}, 12, 12)
    assert float(state[b"rate"]) == pytest.approx(40.5) and b"hold" not in state and b"noise" not in state
    assert float(state[b"episode_share"]) == 0.5  # still one


def test_an_episode_begun_over_40_percent_refused_is_a_probe_from_a_cut_that_refused_less(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    """A share over 40 % can be chance at a few calls: one unlucky start must not make the rest of the
    episode cut without a verdict."""
    state = paced_last_second(redis_url, sync_redis, {**EPISODE, "rate": 45, "episode_share": 0.5}, 40, 10)
    assert (float(state[b"episode_rate"]), float(state[b"episode_share"])) == (45.0, 0.2)
    assert float(state[b"rate"]) == pytest.approx(40.5) and b"hold" not in state  # its first cut


def ended_calls(sync_redis: redis.Redis, answered: int, refused: int, span_ms: int) -> None:
    """`answered` and `refused` calls of model "m" that ended spread over the last `span_ms`."""
    now, total = int(time.time() * 1000), answered + refused
    ok, no = limit_keys("m")[5:7]
    for n in range(total):
        refusal = (n + 1) * refused // total > n * refused // total
        sync_redis.zadd(no if refusal else ok, {f"ended-{n}": now - span_ms + span_ms * n // total})


def refused_now(redis_url: str, sync_redis: redis.Redis, state: dict[str, float]) -> dict[bytes, bytes]:
    """Model "m" paced with `state` (as `paced_last_second`) refuses a call granted now."""
    return paced_last_second(redis_url, sync_redis, state, 0, 1)


def test_at_a_few_calls_a_second_a_new_episodes_share_counts_as_many_seconds_back_as_40_calls_take(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    ended_calls(sync_redis, 30, 10, 7000)  # 25 % of 40 calls in 7 s; the last 2 s hold 11 of them
    state = refused_now(redis_url, sync_redis, {"rate": 6})
    assert float(state[b"episode_share"]) == pytest.approx(11 / 41)


def test_a_probe_at_a_few_calls_a_second_waits_for_its_40_calls_and_then_judges(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    slow = {"episode_rate": 10, "episode_share": 0.25, "rate": 7.29, "decreased_ago": 9000}
    ended_calls(sync_redis, 22, 7, 7000)  # since the guard after the last cut: 29 calls, 30 with this one
    waiting = refused_now(redis_url, sync_redis, slow)
    assert float(waiting[b"rate"]) == 7.29 and b"noise" not in waiting  # no cut, no verdict yet
    assert int(waiting[b"hold"]) - int(waiting[b"decreased"]) == pytest.approx(
        9000 + EPISODE_GAP_S * 1000, abs=50
    )
    sync_redis.delete(*limit_keys("m")[5:7])
    ended_calls(sync_redis, 30, 10, 7000)
    judged = refused_now(redis_url, sync_redis, slow)
    assert b"rate" not in judged and float(judged[b"noise"]) >= 0.25


def test_a_cut_riding_a_limit_holds_nothing(redis_url: str, sync_redis: redis.Redis) -> None:
    state = paced_last_second(redis_url, sync_redis, {"rate": 50}, 49, 1)  # 2 % refused: a sawtooth's cut
    assert float(state[b"rate"]) == pytest.approx(45.0) and b"hold" not in state


def test_a_release_corrects_the_token_estimate_and_frees_the_call_in_flight(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    settings = settings_for(redis_url, ROUTERQ_MAX_IN_FLIGHT="1", ROUTERQ_RATE_LIMIT_TOKENS="100000")

    async def release_then_acquire(client: aredis.Redis) -> tuple[float, float]:
        limiter = SharedLimiter(client, settings)
        lease, _ = await limiter.try_acquire("m", 100)
        assert lease is not None
        _, blocked = await limiter.try_acquire("m", 100)
        await limiter.release(lease, 7)
        again, wait = await limiter.try_acquire("m", 100)
        return blocked, (0.0 if again is not None else wait)

    blocked, after = on_redis(redis_url, release_then_acquire)
    assert blocked > 0 and after == 0.0
    members = sync_redis.zrange("routerq:limit:{*}:tok", 0, -1)
    assert any(m.endswith(b":7") for m in members)


# --- lines waiting for a model's pace (worker.upstream.pace_waiters) ---


def turns_with_waiting(redis_url: str, waiting: int, rate: str | None, **env: str) -> float:
    """What a line that starts waiting for model "m" is told, with `waiting` lines of this process
    already waiting and the model paced at `rate` (None: not paced)."""
    if rate is not None:
        redis.Redis.from_url(redis_url).hset(limit_keys("m")[3], "rate", rate)

    async def turn(client: aredis.Redis) -> float:
        pace = PaceWaiters(SharedLimiter(client, settings_for(redis_url, **env)))
        with ExitStack() as stack:
            for _ in range(waiting):
                stack.enter_context(pace.waiting("m"))
            return await pace.turn("m")

    return on_redis(redis_url, turn)


def test_a_line_waits_in_place_while_less_than_its_models_in_place_pace_waits_ahead(redis_url: str) -> None:
    assert turns_with_waiting(redis_url, 0, "10") == 0.0
    assert turns_with_waiting(redis_url, int(10 * IN_PLACE_S) - 1, "10") == 0.0


def test_a_line_with_more_than_the_in_place_pace_ahead_is_told_about_its_turn(redis_url: str) -> None:
    ahead = int(10 * IN_PLACE_S) + 5
    assert turns_with_waiting(redis_url, ahead, "10") == pytest.approx(ahead / 10)


def test_a_model_not_paced_or_without_discovery_never_sends_a_line_away(redis_url: str) -> None:
    assert turns_with_waiting(redis_url, 500, None) == 0.0
    assert turns_with_waiting(redis_url, 500, "10", ROUTERQ_RATE_DISCOVERY="false") == 0.0


# --- leases (lease_restore.lua) ---


def unacked(client: redis.Redis, tag: str, queue: str, age_s: float) -> None:
    payload = {"body": "e30=", "headers": {}, "properties": {"delivery_tag": tag}}
    client.hset(UNACKED_KEY, tag, json.dumps([payload, "", queue]))
    client.zadd(UNACKED_INDEX_KEY, {tag: time.time() - age_s})


def test_a_message_no_live_lease_holds_goes_back_to_the_head_of_its_queue(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    settings = settings_for(redis_url)
    sync_redis.rpush(settings.queue, "older")
    unacked(sync_redis, "orphan", settings.queue, age_s=60)
    keeper = LeaseKeeper(settings, sync_redis, Holdings())
    keeper.renew()
    assert keeper.restore_orphans() == ["orphan"]
    assert not sync_redis.hexists(UNACKED_KEY, "orphan")
    head = json.loads(sync_redis.lindex(settings.queue, -1) or b"{}")  # consumers BRPOP the right end
    assert head["headers"]["redelivered"] is True


def test_a_message_a_live_lease_holds_young_or_of_another_queue_stays(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    settings = settings_for(redis_url)
    holdings = Holdings()
    holdings.received(SimpleNamespace(message=SimpleNamespace(delivery_tag="held")))  # as task_received does
    unacked(sync_redis, "held", settings.queue, age_s=60)
    unacked(sync_redis, "young", settings.queue, age_s=1)
    unacked(sync_redis, "theirs", "other-queue", age_s=60)
    keeper = LeaseKeeper(settings, sync_redis, holdings)
    keeper.renew()
    assert keeper.restore_orphans() == []
    assert sync_redis.hlen(UNACKED_KEY) == 3


def test_a_finished_message_whose_ack_has_not_landed_is_not_put_back(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    """Celery acknowledges on a later turn of its loop: between the task's end and the ack, the message
    is still in `unacked`, and its holder's lease must still hold it (issue 21's false put-backs)."""
    settings = settings_for(redis_url)
    holdings = Holdings()
    message = SimpleNamespace(delivery_tag="acking", acknowledged=False)
    holdings.received(SimpleNamespace(message=message))
    unacked(sync_redis, "acking", settings.queue, age_s=60)  # a retry that waited out a long countdown
    holder, sweeper = (
        LeaseKeeper(settings, sync_redis, holdings),
        LeaseKeeper(settings, sync_redis, Holdings()),
    )
    holdings.done("acking", message)
    holder.renew()
    sweeper.renew()
    assert sweeper.restore_orphans() == []
    assert sync_redis.hexists(UNACKED_KEY, "acking")
    sync_redis.hdel(UNACKED_KEY, "acking")  # the ack lands, as kombu's does
    sync_redis.zrem(UNACKED_INDEX_KEY, "acking")
    message.acknowledged = True
    holder.renew()
    assert sync_redis.smembers(f"routerq:lease:{settings.queue}:{holder.worker_id}") == {b"alive"}


def test_only_one_worker_of_a_queue_sweeps_per_tick(redis_url: str, sync_redis: redis.Redis) -> None:
    settings = settings_for(redis_url)
    unacked(sync_redis, "orphan", settings.queue, age_s=60)
    first, second = (
        LeaseKeeper(settings, sync_redis, Holdings()),
        LeaseKeeper(settings, sync_redis, Holdings()),
    )
    assert second.restore_orphans() == ["orphan"]
    unacked(sync_redis, "orphan2", settings.queue, age_s=60)
    assert first.restore_orphans() == []  # the tick's lock is taken


# --- uploaded files (routerq.api.file_store) ---


def test_the_sweep_removes_uploads_whose_record_expired_and_keeps_the_rest(
    sync_redis: redis.Redis, tmp_path: Path
) -> None:
    store = FileStore(sync_redis, tmp_path, TTL)
    recorded = StoredFile(
        id=new_file_id(), bytes=1, filename="a", purpose="batch", owner="t", lines=1, urls=[]
    )
    store.add(recorded)
    expired, arriving = new_file_id(), new_file_id()
    for file_id in (recorded.id, expired, arriving):
        store.path(file_id).write_bytes(b"{}\n")
    old = time.time() - SWEEP_IDLE_S - 1
    for file_id in (recorded.id, expired):
        os.utime(store.path(file_id), (old, old))
    assert store.sweep() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([recorded.id, arriving])
    store.delete(recorded)
    assert sorted(p.name for p in tmp_path.iterdir()) == [arriving] and store.get(recorded.id, "t") is None
