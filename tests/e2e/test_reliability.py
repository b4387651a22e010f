"""Faults from the fake upstream, from signals and from Redis: every line ends accounted for."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import (
    DEFAULT_RETRIES,
    Stack,
    calls_with,
    extra_worker,
    line,
    routerq,
    unleased_messages,
    wait_final,
    wait_for,
    write_jsonl,
)

from routerq.core import envelope
from routerq.core.batch_store import Batch, BatchStatus
from routerq.core.broker import LINE_TASK_NAME, LINES_PER_MESSAGE, TASK_NAME
from routerq.core.jobs import Job, JobKind
from routerq.devstack.fake_upstream import roll
from routerq.devstack.localstack import free_port, start_redis, start_worker
from routerq.producer import Producer
from routerq.producer.batch_client import BatchClient
from routerq.worker.execution.app import create_app

CHAT = "meta-llama/llama-3.1-8b-instruct"
FAST_RECOVERY = {  # a worker tuned to get lost lines back within ~30 s
    "ROUTERQ_VISIBILITY_TIMEOUT": "25",
    "ROUTERQ_RESTORE_INTERVAL": "2",
    "ROUTERQ_JOB_TIME_LIMIT": "12",
    "OPENROUTER_TIMEOUT": "10",
    "ROUTERQ_RETRY_MAX_DELAY": "3",
    "ROUTERQ_SWEEP_INTERVAL": "2",
}


def configure_fake(stack: Stack, **config: Any) -> None:
    httpx.post(f"{stack.fake_base}/_fake/config", json=config).raise_for_status()


@pytest.fixture
def fake_rules(stack: Stack) -> Iterator[None]:
    yield
    configure_fake(stack, rules=[], keys=[stack.api_key])


def settle_paused(client: BatchClient, batch_id: str) -> Batch:
    """Wait for the pause, then for every line without an outcome to be set aside (parked): none running,
    none left on the queue."""
    wait_for(lambda: client.get(batch_id).status is BatchStatus.PAUSED, f"batch {batch_id} to pause", 30)

    def settled() -> bool:
        batch = client.get(batch_id)
        return batch.running == batch.held == batch.queued == 0

    wait_for(settled, f"batch {batch_id}'s lines to land or be parked", 30)
    return client.get(batch_id)


def paid_duplicates(calls: list[dict[str, Any]]) -> int:
    """Successful upstream answers beyond the first for the same line: money spent twice."""
    ok = defaultdict(int)
    for call in calls:
        if call.get("ok"):
            ok[call["prompt"]] += 1
    return sum(n - 1 for n in ok.values())


def children_of(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def submit(client: BatchClient, tmp_path: Path, marker: str, n: int, suffix: str = "") -> Batch:
    rows = [line(f"l{i}", "chat", f"{marker} {i}{suffix}") for i in range(n)]
    return client.submit(write_jsonl(tmp_path / f"{marker}.jsonl", rows)).batch


def fair_seed(rule: dict[str, Any], prompts: list[str], max_attempts: int) -> str:
    """A seed for the fake's fault dice under which no prompt meets `max_attempts` failures (5xx,
    200-with-error) before its first success: with 120 lines about 1 run in 130 would otherwise fail
    a line by the dice alone, and a line that fails here must be routerq's doing."""
    failing = rule["rate_429"] + rule["rate_502"] + rule["rate_200_error"]

    def succeeds(seed: str, prompt: str) -> bool:
        failures = 0
        for attempt in itertools.count(1):
            rolled = roll(seed, prompt, attempt)
            if rolled < rule["rate_429"]:
                continue  # a wait, not an attempt
            if rolled >= failing:
                return True
            failures += 1
            if failures >= max_attempts:
                return False
        return False

    return next(
        seed for n in itertools.count() if all(succeeds(seed := f"{rule['match']}-{n}", p) for p in prompts)
    )


def test_a_429_storm_at_default_settings_fails_no_line(
    stack: Stack, tmp_path: Path, fake_rules: None
) -> None:
    """25 % 429 (Retry-After 1), 10 % 502, 5 % 200-with-error, default retry settings: rate limits are
    back-pressure (they never use up the attempt budget), so every line succeeds, none early."""
    marker = uuid.uuid4().hex[:8]
    rule: dict[str, Any] = {
        "match": marker,
        "rate_429": 0.25,
        "retry_after": 1,
        "rate_502": 0.1,
        "rate_200_error": 0.05,
    }
    rule["seed"] = fair_seed(
        rule, [f"{marker} {i}" for i in range(120)], int(DEFAULT_RETRIES["ROUTERQ_MAX_ATTEMPTS"])
    )
    configure_fake(stack, rules=[rule])
    queue = f"faults-{marker}"
    with extra_worker(stack, queue, concurrency=8, **DEFAULT_RETRIES) as (_, settings):
        client = BatchClient(settings)
        batch = submit(client, tmp_path, marker, 120)
        final = wait_final(client, batch.id)
    assert (final.status, final.succeeded, final.failed) == (BatchStatus.COMPLETED, 120, 0)

    calls = calls_with(stack, marker)
    by_line: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for call in calls:
        by_line[call["prompt"]].append(call)
    statuses = [c["status"] for c in calls]
    most_429 = max(sum(c["status"] == 429 for c in v) for v in by_line.values())
    print(f"120 lines, {len(calls)} upstream calls: {statuses.count(429)} x 429, {statuses.count(502)} x 502, "
          f"most 429s for one line {most_429}")  # fmt: skip
    assert statuses.count(429) > 0 and statuses.count(502) > 0
    for attempts in by_line.values():
        assert sum(c["status"] != 429 for c in attempts) <= 6  # ROUTERQ_MAX_ATTEMPTS counts the rest
        attempts.sort(key=lambda c: c["t"])
        for before, after in pairwise(attempts):
            if before["status"] == 429:  # Retry-After: 1 was respected
                assert after["t"] >= before["t_end"] + 1.0 - 0.01, (before, after)
    assert paid_duplicates(calls) == 0


def test_a_retried_line_is_tried_again_after_its_backoff_not_behind_the_rest_of_the_batch(
    stack: Stack, tmp_path: Path
) -> None:
    """Default retry settings: the first line's first call fails (502); its retry comes back while the
    batch's other lines are still queued, not after all of them. (It runs once its countdown, up to
    1 s, is due and the ~50 lines the worker already holds have had their slots: ~4 s into a ~10 s
    batch. Behind the batch, as before, it was the last call.)"""
    marker = uuid.uuid4().hex[:8]
    rows = [
        line(f"l{i}", "chat", f"{marker} {i} [[slow:0.03]]{' [[flaky:1:502]]' if i == 0 else ''}")
        for i in range(600)
    ]
    with extra_worker(stack, f"front-{marker}", concurrency=2, **DEFAULT_RETRIES) as (_, settings):
        client = BatchClient(settings, tracing=False)
        batch = client.submit(write_jsonl(tmp_path / "front.jsonl", rows)).batch
        final = wait_final(client, batch.id)
    assert (final.succeeded, final.failed) == (600, 0)
    calls = sorted(calls_with(stack, marker), key=lambda c: c["t"])
    first_line = [n for n, call in enumerate(calls) if call["prompt"].split()[1] == "0"]
    assert [calls[n]["status"] for n in first_line] == [502, 200]
    assert first_line[1] < len(calls) // 2, f"its retry was call {first_line[1]} of {len(calls)}"


def test_concurrency_is_calls_in_flight_over_a_few_processes_and_a_dead_one_is_started_again(
    stack: Stack, tmp_path: Path
) -> None:
    """`routerq worker --concurrency 8 --processes 2`: 8 calls at once from 2 processes;
    a process killed mid-batch is started again and its lines come back."""
    marker = uuid.uuid4().hex[:8]
    queue = f"processes-{marker}"
    env = {**FAST_RECOVERY, "ROUTERQ_QUEUE": queue}
    client = BatchClient(stack.settings(**env))
    with extra_worker(stack, queue, concurrency=8, processes=2, **env) as (worker, _):
        first = children_of(worker.process.pid)
        assert len(first) == 2
        batch = submit(client, tmp_path, marker, 48, " [[slow:0.5]]")
        wait_for(lambda: client.get(batch.id).succeeded >= 16, "16 lines to succeed")
        os.kill(first[0], signal.SIGKILL)
        final = wait_final(client, batch.id, timeout=120)
        assert worker.alive()
        restarted = children_of(worker.process.pid)
        assert len(restarted) == 2 and first[0] not in restarted and first[1] in restarted
        assert "worker process 0 exited unexpectedly" in worker.log()
    assert (final.succeeded, final.failed) == (48, 0)
    calls = calls_with(stack, marker)
    starts = sorted((c["t"], 1) for c in calls)
    ends = sorted((c["t_end"], -1) for c in calls)
    in_flight, most = 0, 0
    for _, step in sorted(starts + ends, key=lambda e: (e[0], e[1])):
        in_flight += step
        most = max(most, in_flight)
    assert most == 8, most  # calls in flight reached the concurrency and never passed it


def test_sigkill_of_the_whole_worker_loses_no_line_and_its_lines_are_back_within_a_minute(
    stack: Stack, tmp_path: Path
) -> None:
    """Default settings (a 300 s visibility timeout): the dead worker's lease expires, and the new
    worker puts the lines it held back on the queue long before the visibility timeout would."""
    marker = uuid.uuid4().hex[:8]
    queue = f"sigkill-{marker}"
    env = {"ROUTERQ_QUEUE": queue}
    client = BatchClient(stack.settings(**env))
    with extra_worker(stack, queue, concurrency=8, **env) as (worker, _):
        batch = submit(client, tmp_path, marker, 500, " [[slow:0.2]]")
        wait_for(lambda: client.get(batch.id).succeeded >= 150, "150 lines to succeed")
        in_flight = client.get(batch.id).running
        worker.stop(signal.SIGKILL)
        killed_at = time.monotonic()
    with extra_worker(stack, queue, concurrency=8, **env):
        final = wait_final(client, batch.id)
        recovered = time.monotonic() - killed_at
    calls = calls_with(stack, marker)
    duplicates = paid_duplicates(calls)
    print(f"500 lines, {len(calls)} calls, {in_flight} in flight at the kill, {duplicates} paid twice, "
          f"all done {recovered:.1f} s after the kill")  # fmt: skip
    assert (final.succeeded, final.failed, final.cancelled) == (500, 0, 0)
    assert duplicates <= max(in_flight, 8)
    assert recovered < 60, f"the batch finished {recovered:.0f} s after the kill"


def test_a_retry_waiting_out_a_long_retry_after_is_not_taken_for_a_dead_workers_message(
    stack: Stack, tmp_path: Path
) -> None:
    """A 429 with Retry-After 25 s: the retry waits, unacknowledged, in the live worker for longer than
    the lease grace; the worker's lease holds it, so it is not put back on the queue and run twice."""
    marker = uuid.uuid4().hex[:8]
    queue = f"long-wait-{marker}"
    env = {"ROUTERQ_QUEUE": queue, **DEFAULT_RETRIES}
    client = BatchClient(stack.settings(**env))
    with (
        extra_worker(stack, queue, concurrency=2, **env) as (worker, _),
        unleased_messages(stack, queue) as gaps,
    ):
        batch = submit(client, tmp_path, marker, 1, " [[flaky:1:429]] [[retry-after:25]]")
        final = wait_final(client, batch.id, timeout=90)
        assert "put back on" not in worker.log()
    assert not gaps, f"messages out of their live holder's lease: {gaps}"
    assert (final.succeeded, final.failed) == (1, 0)
    calls = calls_with(stack, marker)
    assert [c["status"] for c in calls] == [429, 200], calls
    assert calls[1]["t"] - calls[0]["t_end"] >= 25 - 0.01


def test_redis_killed_and_restarted_mid_batch_loses_nothing(stack: Stack, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex[:8]
    port, data = free_port(), tmp_path / "redis"
    own_redis = start_redis(port, data)
    env = {**FAST_RECOVERY, "REDIS_URL": own_redis.url, "ROUTERQ_QUEUE": f"redis-restart-{marker}"}
    try:
        client = BatchClient(stack.settings(**env))
        with extra_worker(stack, env["ROUTERQ_QUEUE"], concurrency=8, **env):
            batch = submit(client, tmp_path, marker, 200, " [[slow:0.1]]")
            wait_for(lambda: client.get(batch.id).succeeded >= 50, "50 lines to succeed")
            own_redis.stop(signal.SIGKILL)
            time.sleep(2)
            own_redis = start_redis(port, data)
            final = wait_final(client, batch.id)
    finally:
        own_redis.stop()
    calls = calls_with(stack, marker)
    print(f"200 lines, {len(calls)} calls, {paid_duplicates(calls)} paid twice across the Redis restart")
    assert (final.succeeded, final.failed) == (200, 0)


def test_redis_frozen_mid_batch_stalls_the_worker_which_then_finishes_paying_only_for_calls_in_flight(
    stack: Stack, tmp_path: Path
) -> None:
    """SIGSTOP: connections stay open and nothing answers (a hung host, a full disk). At default
    settings the worker waits it out, no line is lost, and the only answers paid twice are those of
    calls that were in flight when Redis froze."""
    marker = uuid.uuid4().hex[:8]
    own_redis = start_redis(free_port(), tmp_path / "redis")
    env = {"REDIS_URL": own_redis.url, "ROUTERQ_QUEUE": f"redis-freeze-{marker}", **DEFAULT_RETRIES}
    concurrency = 8
    try:
        client = BatchClient(stack.settings(**env), tracing=False)
        with extra_worker(stack, env["ROUTERQ_QUEUE"], concurrency=concurrency, **env) as (worker, _):
            batch = submit(client, tmp_path, marker, 200, " [[slow:0.1]]")
            wait_for(lambda: client.get(batch.id).succeeded >= 50, "50 lines to succeed")
            own_redis.process.send_signal(signal.SIGSTOP)
            time.sleep(10)  # the outage itself: nothing to wait for, Redis is frozen on purpose
            own_redis.process.send_signal(signal.SIGCONT)
            final = wait_final(client, batch.id)
            assert worker.alive(), "the worker exited during the outage"
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
        own_redis.stop()
    calls = calls_with(stack, marker)
    assert (final.succeeded, final.failed) == (200, 0)
    assert {c["prompt"] for c in calls} == {f"{marker} {i} [[slow:0.1]]" for i in range(200)}
    assert paid_duplicates(calls) <= concurrency, f"{paid_duplicates(calls)} answers paid twice"


@contextmanager
def submit_while_redis_dies(
    stack: Stack, tmp_path: Path, down_for: float | None
) -> Iterator[tuple[Batch | Exception, redis.Redis, str]]:
    """Submit 20,000 lines to a Redis of our own and SIGKILL it once 6,000 are staged; restart it after
    `down_for` s, or only once the submit has given up (None). Returns what the submit returned or
    raised, a client of the restarted Redis, and the queue name."""
    port, data = free_port(), tmp_path / "redis"
    own = start_redis(port, data)
    queue = f"submit-outage-{uuid.uuid4().hex[:8]}"
    client = BatchClient(stack.settings(REDIS_URL=own.url, ROUTERQ_QUEUE=queue), tracing=False)
    rows = [line(f"s{i}", "chat", f"outage {i}") for i in range(20_000)]
    path = write_jsonl(tmp_path / "outage.jsonl", rows)
    outcome: list[Batch | Exception] = []

    def run() -> None:
        try:
            outcome.append(client.submit(path).batch)
        except Exception as exc:
            outcome.append(exc)

    submitter = threading.Thread(target=run)
    submitter.start()
    watch = redis.Redis.from_url(own.url)
    deadline = time.monotonic() + 60
    staged = 6000 // LINES_PER_MESSAGE  # messages
    while not any(watch.llen(k) >= staged for k in watch.scan_iter("routerq:batch:*:staging")):
        assert submitter.is_alive(), f"the submit ended before Redis could be killed: {outcome}"
        assert time.monotonic() < deadline, "waited 60 s for 6,000 staged lines"
        time.sleep(0.002)
    own.stop(signal.SIGKILL)
    submitter.join(timeout=down_for)
    own = start_redis(port, data)
    submitter.join()
    own.stop()  # flush and restart, so what is checked is what Redis kept on disk
    own = start_redis(port, data)
    try:
        yield outcome[0], redis.Redis.from_url(own.url), queue
    finally:
        own.stop()


def queued_line_indexes(client: redis.Redis, queue: str) -> list[int]:
    return [index for raw in client.lrange(queue, 0, -1) for index in line_indexes(raw)]


def test_submit_rides_out_a_short_redis_restart_and_queues_every_line_once(
    stack: Stack, tmp_path: Path
) -> None:
    with submit_while_redis_dies(stack, tmp_path, down_for=1.0) as (outcome, client, queue):
        assert isinstance(outcome, Batch), outcome
        assert outcome.status is BatchStatus.IN_PROGRESS
        assert sorted(queued_line_indexes(client, queue)) == list(range(20_000))


def test_submit_in_a_long_redis_outage_fails_clearly_and_queues_nothing(stack: Stack, tmp_path: Path) -> None:
    with submit_while_redis_dies(stack, tmp_path, down_for=None) as (outcome, client, queue):
        assert isinstance(outcome, Exception)
        assert "none of its 20000 lines were enqueued" in str(outcome)
        assert "Redis is still unreachable" in str(outcome) and "submit again" in str(outcome)
        assert client.llen(queue) == 0


def line_indexes(raw: bytes) -> list[int]:
    """The batch line indexes a queued Celery message carries."""
    message = envelope.parse(raw)
    assert message is not None and message.task == LINE_TASK_NAME, raw[:200]
    return [int(i) for i in message.args[1]]


def test_a_line_whose_queue_message_redis_lost_is_found_and_sent_again(stack: Stack, tmp_path: Path) -> None:
    """Redis can lose a message outright (killed between a worker's BRPOP and kombu's unacked record):
    the batch still knows the line, so a worker sends it again."""
    marker = uuid.uuid4().hex[:8]
    queue = f"lost-{marker}"
    env = {**FAST_RECOVERY, "ROUTERQ_QUEUE": queue}
    client = BatchClient(stack.settings(**env))
    batch = submit(client, tmp_path, marker, 20)
    broker = redis.Redis.from_url(stack.redis.url)
    queued = broker.lrange(queue, 0, -1)
    assert sorted(i for raw in queued for i in line_indexes(raw)) == list(range(20))
    lost = next(raw for raw in queued if 17 in line_indexes(raw))
    assert line_indexes(lost) == [16, 17, 18, 19]  # 16 lines a message: the second message
    broker.lrem(queue, 1, lost)
    with extra_worker(stack, queue, concurrency=4, **env) as (worker, _):
        final = wait_final(client, batch.id, timeout=60)
    assert (final.succeeded, final.failed) == (20, 0)
    assert "4 line(s) had no outcome and no message in Redis" in worker.log()
    assert "sent again: 16,17,18,19" in worker.log()
    assert sorted(c["prompt"] for c in calls_with(stack, marker)) == sorted(
        f"{marker} {i}" for i in range(20)
    )


def test_a_single_job_whose_queue_message_redis_lost_is_sent_again(stack: Stack) -> None:
    marker = uuid.uuid4().hex[:8]
    queue = f"lost-job-{marker}"
    env = {**FAST_RECOVERY, "ROUTERQ_QUEUE": queue}
    producer = Producer(stack.settings(**env), tracing=False)
    handle = producer.enqueue(
        {"model": CHAT, "messages": [{"role": "user", "content": f"{marker} lost job"}]}
    )
    broker = redis.Redis.from_url(stack.redis.url)
    assert broker.lrem(queue, 1, broker.lrange(queue, 0, -1)[0]) == 1
    with extra_worker(stack, queue, concurrency=2, **env) as (worker, _):
        result = handle.get(timeout=60)
        log = worker.log()
    assert result.ok
    assert f"job {handle.id} had no result and no message in Redis (lost by the broker); sent again" in log
    assert len(calls_with(stack, marker)) == 1
    assert broker.zcard(f"routerq:jobs:pending:{queue}") == 0


def test_a_worker_whose_consumer_stops_reading_the_queue_is_started_again(
    stack: Stack, tmp_path: Path
) -> None:
    """Celery's consumer can come back from a Redis outage connected but deaf; `cancel_consumer` puts a
    live worker in that state on purpose."""
    marker = uuid.uuid4().hex[:8]
    queue = f"deaf-{marker}"
    env = {**FAST_RECOVERY, "ROUTERQ_QUEUE": queue}
    client = BatchClient(stack.settings(**env))
    with extra_worker(stack, queue, concurrency=2, **env) as (worker, settings):
        replies = create_app(settings).control.cancel_consumer(queue, reply=True, timeout=5)
        assert any("no longer consuming" in json.dumps(r) for r in replies), replies
        batch = submit(client, tmp_path, marker, 10)
        final = wait_final(client, batch.id, timeout=90)
        log = worker.log()
    assert (final.succeeded, final.failed) == (10, 0)
    assert "the consumer stopped taking jobs" in log
    assert "exited unexpectedly (code 75)" in log


def test_a_401_pauses_the_batch_without_burning_lines_and_resume_finishes_it(
    stack: Stack, tmp_path: Path, fake_rules: None
) -> None:
    marker = uuid.uuid4().hex[:8]
    queue = f"auth-{marker}"
    with extra_worker(stack, queue, concurrency=2) as (_, settings):
        client = BatchClient(settings)
        batch = submit(client, tmp_path, marker, 40, " [[slow:0.1]]")
        wait_for(lambda: client.get(batch.id).succeeded >= 5, "5 lines to succeed", poll=0.02)
        configure_fake(stack, keys=["sk-or-v1-someone-else"])  # the key was revoked mid-batch
        paused = settle_paused(client, batch.id)
        assert paused.status is BatchStatus.PAUSED and "401" in (paused.reason or "")
        assert paused.failed == 0 and paused.succeeded < 40
        status = routerq(stack, "status", batch.id, env={"ROUTERQ_QUEUE": queue})
        assert "paused: HTTP 401" in status.stdout
        watched = routerq(stack, "status", batch.id, "--watch", env={"ROUTERQ_QUEUE": queue}, timeout=30)
        assert watched.returncode == 3 and f"routerq resume {batch.id}" in watched.stderr  # not frozen
        unauthorized = [c for c in calls_with(stack, marker) if c["status"] == 401]
        assert 1 <= len(unauthorized) <= 2  # one per worker slot at most, not 40 identical failures

        configure_fake(stack, keys=[stack.api_key])
        done = routerq(stack, "resume", batch.id, env={"ROUTERQ_QUEUE": queue})
        assert done.returncode == 0, done.stderr
        final = wait_final(client, batch.id)
    assert (final.status, final.succeeded, final.failed) == (BatchStatus.COMPLETED, 40, 0)


def test_a_batch_pauses_when_its_budget_is_spent_passing_it_by_at_most_one_call(
    stack: Stack, tmp_path: Path
) -> None:
    """Each call reserves its estimated cost first: with 4 slots and calls in flight, the spend still
    stops within about one call of the budget (it overshot 5x when calls were not reserved)."""
    marker = uuid.uuid4().hex[:8]
    rows = [line(f"b{i}", "chat", f"{marker} {i} [[slow:0.05]]") for i in range(30)]
    client = BatchClient(stack.settings())
    batch = client.submit(write_jsonl(tmp_path / "budget.jsonl", rows), max_cost=2e-6).batch
    paused = settle_paused(client, batch.id)
    assert paused.status is BatchStatus.PAUSED and "budget" in (paused.reason or "")
    assert 0 < paused.succeeded < 30 and paused.cost >= 2e-6
    per_call = paused.cost / paused.succeeded  # the lines are alike: each costs about the same
    assert paused.cost <= 2e-6 + 1.5 * per_call, (paused.cost, per_call, paused.succeeded)
    again = routerq(stack, "resume", batch.id)  # no new budget: refused, nothing spent
    assert again.returncode == 1 and "--max-cost above" in again.stderr
    assert client.get(batch.id).status is BatchStatus.PAUSED
    assert client.resume(batch.id, max_cost=1.0) > 0
    final = wait_final(client, batch.id)
    assert (final.succeeded, final.failed) == (30, 0)


def test_cancelling_a_paused_batch_ends_it_and_sends_nothing_more(stack: Stack, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex[:8]
    rows = [line(f"c{i}", "chat", f"{marker} {i} [[slow:0.05]]") for i in range(40)]
    client = BatchClient(stack.settings())
    batch = client.submit(write_jsonl(tmp_path / "cancel-paused.jsonl", rows), max_cost=2e-6).batch
    paused = settle_paused(client, batch.id)
    assert paused.status is BatchStatus.PAUSED
    sent = len(calls_with(stack, marker))
    done = routerq(stack, "cancel", batch.id)
    assert done.returncode == 0, done.stderr
    final = wait_final(client, batch.id, timeout=60)
    assert final.status is BatchStatus.CANCELLED
    assert final.succeeded + final.cancelled == 40 and final.parked == 0
    assert len(calls_with(stack, marker)) == sent  # the parked lines were never sent upstream


def test_a_hanging_upstream_times_out_and_retries_while_the_worker_stays_responsive(
    stack: Stack, tmp_path: Path, fake_rules: None
) -> None:
    marker = uuid.uuid4().hex[:8]
    configure_fake(stack, rules=[{"match": marker, "hang_first": 1, "hang_s": 60}])
    queue = f"hang-{marker}"
    env = {"OPENROUTER_TIMEOUT": "2", "ROUTERQ_JOB_TIME_LIMIT": "10"}
    # one process: three of its four call slots hang, the fourth must still serve the probe
    with extra_worker(stack, queue, concurrency=4, processes=1, **env) as (_, settings):
        client = BatchClient(settings)
        batch = submit(client, tmp_path, marker, 3)
        wait_for(lambda: len(calls_with(stack, marker)) >= 3, "the 3 lines' first calls to hang at the fake")
        probe = Producer(settings).run(
            Job(
                kind=JobKind.CHAT,
                body={"model": CHAT, "messages": [{"role": "user", "content": "still there?"}]},
            ),
            timeout=10,
        )
        # served while the three calls hung: it reached the fake before any of them timed out and
        # was tried again
        assert probe.ok
        (probe_call,) = [
            c
            for c in calls_with(stack, "still there?")
            if c["body"]["messages"][0]["content"] == "still there?"
        ][-1:]
        retried = [c for c in calls_with(stack, marker) if c["attempt"] == 2]
        assert all(probe_call["t"] < c["t"] for c in retried), (probe_call, retried)
        final = wait_final(client, batch.id, timeout=60)
    assert (final.succeeded, final.failed) == (3, 0)
    calls = calls_with(stack, marker)
    assert len(calls) == 6 and sorted(c["attempt"] for c in calls) == [1, 1, 1, 2, 2, 2]


def test_the_shared_limiter_holds_across_worker_processes(stack: Stack, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex[:8]
    queue = f"limit-{marker}"
    limits = {"ROUTERQ_RATE_LIMIT_REQUESTS": "10", "ROUTERQ_RATE_LIMIT_WINDOW": "5"}
    with (
        extra_worker(stack, queue, concurrency=4, **limits) as (_, settings),
        extra_worker(stack, queue + "-b", concurrency=4, **{**limits, "ROUTERQ_QUEUE": queue}),
    ):
        client = BatchClient(settings)
        batch = submit(client, tmp_path, marker, 30)
        final = wait_final(client, batch.id, timeout=60)
    assert final.succeeded == 30
    starts = sorted(c["t"] for c in calls_with(stack, marker))
    busiest = max(sum(1 for t in starts if s <= t < s + 5.0) for s in starts)
    print(f"30 lines, limit 10 per 5 s over two workers: busiest 5 s window saw {busiest} calls")
    assert busiest <= 10 + 1  # +1: the fake stamps arrival, the limiter stamps the grant a moment earlier
    assert starts[-1] - starts[0] >= 10.0  # 30 calls at 10 per 5 s need at least two full windows


def test_a_poison_line_is_tried_a_bounded_number_of_times_and_the_rest_succeed(
    stack: Stack, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex[:8]
    queue = f"poison-{marker}"
    rows = [line(f"ok{i}", "chat", f"{marker} fine {i}") for i in range(10)]
    rows.insert(5, line("poison", "chat", f"{marker} poison [[slow:3]]"))
    with extra_worker(stack, queue, concurrency=1, ROUTERQ_MAX_DELIVERIES="3") as (worker, settings):
        client = BatchClient(settings)
        batch = client.submit(write_jsonl(tmp_path / "poison.jsonl", rows)).batch
        stop = threading.Event()

        def kill_whoever_runs_the_poison() -> None:
            killed = 0
            while not stop.is_set():
                seen = len([c for c in calls_with(stack, marker) if "poison" in c["prompt"]])
                if seen > killed:
                    for pid in children_of(worker.process.pid):  # the worker process under the supervisor
                        os.kill(pid, signal.SIGKILL)  # as a crash in the middle of the line would
                    killed = seen
                time.sleep(0.1)

        killer = threading.Thread(target=kill_whoever_runs_the_poison, daemon=True)
        killer.start()
        try:
            final = wait_final(client, batch.id, timeout=150)  # three crashes, each back within ~15 s
        finally:
            stop.set()
            killer.join()
        assert worker.alive()
    assert (final.succeeded, final.failed) == (10, 1)
    poison_calls = [c for c in calls_with(stack, marker) if "poison" in c["prompt"]]
    assert len(poison_calls) == 3
    out = tmp_path / "out.jsonl"
    routerq(stack, "results", batch.id, "-o", str(out), env={"ROUTERQ_QUEUE": queue})
    poisoned = next(json.loads(x) for x in out.read_text().splitlines() if '"poison"' in x)
    assert poisoned["error"]["code"] == "worker_lost" and "died 3 times" in poisoned["error"]["message"]


def test_sigterm_finishes_running_lines_and_returns_the_rest_at_once(stack: Stack, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex[:8]
    queue = f"sigterm-{marker}"
    env = {"ROUTERQ_QUEUE": queue}  # default visibility timeout (300 s): the test shows it is not waited for
    client = BatchClient(stack.settings(**env))
    with extra_worker(stack, queue, concurrency=2, **env) as (worker, _):
        batch = submit(client, tmp_path, marker, 12, " [[slow:1]]")
        wait_for(lambda: len(calls_with(stack, marker)) >= 3, "3 lines to reach the fake upstream")
        worker.stop(signal.SIGTERM, timeout=30)
        stopped_at = time.monotonic()
    after_stop = client.get(batch.id)
    assert after_stop.running == 0  # what was running finished
    with extra_worker(stack, queue, concurrency=4, **env):
        final = wait_final(client, batch.id, timeout=60)
        took = time.monotonic() - stopped_at
    assert (final.succeeded, final.failed) == (12, 0)
    assert took < 60  # far below the 300 s visibility timeout: nothing waited for redelivery
    assert paid_duplicates(calls_with(stack, marker)) == 0


def test_one_ctrl_c_is_a_warm_shutdown_that_returns_unstarted_lines_at_once(
    stack: Stack, tmp_path: Path
) -> None:
    """A terminal's Ctrl-C reaches the supervisor and its worker processes together (one process
    group): running calls finish, nothing crashes, and the lines not started are back on the queue."""
    marker = uuid.uuid4().hex[:8]
    queue = f"ctrl-c-{marker}"
    env = {"ROUTERQ_QUEUE": queue}
    client = BatchClient(stack.settings(**env))
    with extra_worker(stack, queue, concurrency=2, **env) as (worker, _):
        batch = submit(client, tmp_path, marker, 40, " [[slow:1]]")
        wait_for(lambda: len(calls_with(stack, marker)) >= 2, "2 lines to reach the fake upstream")
        os.killpg(worker.process.pid, signal.SIGINT)
        worker.process.wait(30)
        stopped_at = time.monotonic()
    log = worker.log()
    assert "NotImplementedError" not in log and "Unrecoverable error" not in log
    assert "exited unexpectedly" not in log  # the supervisor did not restart anything
    assert client.get(batch.id).running == 0
    broker = redis.Redis.from_url(stack.redis.url)
    held = [raw for raw in broker.hvals("unacked") if queue.encode() in raw]
    assert held == []  # nothing left for a visibility timeout or a lease to bring back
    with extra_worker(stack, queue, concurrency=8, **env):
        final = wait_final(client, batch.id, timeout=60)
        took = time.monotonic() - stopped_at
    assert (final.succeeded, final.failed) == (40, 0)
    assert took < 60
    assert paid_duplicates(calls_with(stack, marker)) == 0


class _Boom:
    """Unpickling this runs a shell command: what a pickle message in the queue could do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.target}",))


def test_a_pickle_message_in_the_queue_is_refused_and_never_executed(stack: Stack, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    app = create_app(stack.settings())
    with app.producer_or_acquire() as producer:
        producer.publish(
            ([_Boom(target)], {}, {}),
            routing_key=stack.env.get("ROUTERQ_QUEUE", "routerq"),
            serializer="pickle",
            headers={"task": TASK_NAME, "id": "pickle-job", "lang": "py", "argsrepr": "", "kwargsrepr": ""},
        )
    wait_for(
        lambda: "untrusted content" in stack.worker.log().lower(), "the worker to refuse the pickle message"
    )
    assert not target.exists()
    assert "pickle" in stack.worker.log()
    assert redis.Redis.from_url(stack.env["REDIS_URL"]).get("routerq:result:pickle-job") is None


def test_a_password_protected_redis_works(stack: Stack, tmp_path: Path) -> None:
    password = uuid.uuid4().hex
    own_redis = start_redis(free_port(), tmp_path / "redis-auth", password=password)
    try:
        assert f":{password}@" in own_redis.url
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(own_redis.url.replace(password, "wrong")).ping()
        env = {"REDIS_URL": own_redis.url, "ROUTERQ_QUEUE": "with-password"}
        worker = start_worker({**stack.env, **env}, tmp_path, name="auth-worker", concurrency=1)
        try:
            job = Job(
                kind=JobKind.CHAT,
                body={"model": CHAT, "messages": [{"role": "user", "content": "behind a password"}]},
            )
            assert Producer(stack.settings(**env)).run(job, timeout=30).ok
            assert password not in worker.log()
        finally:
            worker.stop()
    finally:
        own_redis.stop()


def test_openinference_hide_settings_cover_inputs_outputs_and_embeddings(stack: Stack) -> None:
    from phoenix.client import Client

    secret = f"confidential-{uuid.uuid4().hex[:8]}"
    session = f"hidden-{uuid.uuid4().hex[:8]}"
    hide = {
        "OPENINFERENCE_HIDE_INPUTS": "true",
        "OPENINFERENCE_HIDE_OUTPUTS": "true",
        "OPENINFERENCE_HIDE_EMBEDDINGS_TEXT": "true",
        "OPENINFERENCE_HIDE_EMBEDDINGS_VECTORS": "true",
    }
    with extra_worker(stack, session, **hide):
        env = {**hide, "ROUTERQ_QUEUE": session}
        chat = routerq(
            stack, "enqueue", "--model", CHAT, "--session", session, "--wait", f"{secret} chat", env=env
        )
        emb = routerq(stack, "enqueue", "--embed", "--model", "openai/text-embedding-3-small", "--session", session,
                      "--wait", f"{secret} embed", env=env)  # fmt: skip
        assert chat.returncode == 0 and emb.returncode == 0, chat.stderr + emb.stderr
    assert secret in chat.stdout  # the answer itself is not hidden from the user, only from traces
    phoenix = Client(base_url=stack.phoenix.url)
    deadline = time.monotonic() + 60
    spans: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        traces = phoenix.traces.get_traces(
            project_identifier=stack.project, session_id=session, include_spans=True
        )
        spans = [span for t in traces for span in t.get("spans", [])]
        if len(traces) == 2 and len(spans) >= 6:  # each job: routerq.job, its run and its call
            break
        time.sleep(0.5)
    names = {s["name"] for s in spans}
    assert {"routerq.job", "ChatCompletion", "CreateEmbeddings"} <= names, names
    dumped = json.dumps(spans)
    assert secret not in dumped
    assert ".embedding.vector" not in dumped
