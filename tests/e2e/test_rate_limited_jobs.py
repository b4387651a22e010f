"""A single job that meets rate limits, on a worker at routerq's default retry settings: one call at a
time, each after the Retry-After, no copy of it calling, and a waiting `enqueue --wait` says why."""

from __future__ import annotations

import itertools
import time
import uuid
from pathlib import Path

import pytest
from conftest import (
    DEFAULT_RETRIES,
    MODELS,
    Stack,
    calls_with,
    extra_worker,
    line,
    routerq,
    unleased_messages,
    wait_final,
    write_jsonl,
)

from routerq.producer import Producer
from routerq.producer.batch_client import BatchClient


def test_enqueue_wait_on_a_rate_limited_job_says_why_it_waits_and_calls_once_per_retry_after(
    stack: Stack,
) -> None:
    marker = uuid.uuid4().hex[:8]
    queue = f"limited-{marker}"
    with extra_worker(stack, queue, concurrency=8, **DEFAULT_RETRIES):
        done = routerq(
            stack, "enqueue", "--wait", f"{marker} Retry me [[flaky:2:429]] [[retry-after:2]]",
            env={"ROUTERQ_QUEUE": queue},
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()  # the answer, once the 429s are over
    assert "waits: fake flaky upstream error; next try in" in done.stderr
    assert "ROUTERQ_MAX_RETRY_TIME" in done.stderr and "does not stop the job" in done.stderr
    starts = sorted(c["t"] for c in calls_with(stack, marker))
    assert len(starts) == 3  # two 429s and the success: no copy called
    assert all(later - earlier >= 1.9 for earlier, later in itertools.pairwise(starts)), (
        starts
    )  # Retry-After: 2


SOAK_S = 180  # the false put-backs came about once in five minutes in the soak (bench.soak_rate_limited)


@pytest.mark.timeout(SOAK_S + 240)
def test_an_always_rate_limited_job_beside_traffic_calls_once_per_retry_after_and_is_never_put_back(
    stack: Stack, tmp_path: Path
) -> None:
    """Issue 21's reproduction, at default settings: one job that always meets a 429 (Retry-After 2),
    beside a single job every 2 s and a 60-line batch every 10 s, for three minutes. Its retries wait
    out growing countdowns past the lease grace; no message is ever out of its live holder's lease, none
    is put back, the job never runs as two copies, and every call comes after the last one's Retry-After."""
    marker = uuid.uuid4().hex[:8]
    queue = f"soak-{marker}"
    env = {"ROUTERQ_QUEUE": queue, **DEFAULT_RETRIES}
    settings = stack.settings(**env)
    producer, batches = Producer(settings, tracing=False), BatchClient(settings, tracing=False)
    limited = f"{marker} always limited [[status:429]] [[retry-after:2]]"
    with (
        extra_worker(stack, queue, concurrency=8, **env) as (worker, _),
        unleased_messages(stack, queue) as gaps,
    ):
        producer.enqueue({"model": MODELS["chat"], "messages": [{"role": "user", "content": limited}]})
        singles, submitted = [], []
        end = time.monotonic() + SOAK_S
        for n in itertools.count():
            if time.monotonic() >= end:
                break
            content = f"{marker} single {n}"
            singles.append(
                producer.enqueue(
                    {"model": MODELS["chat"], "messages": [{"role": "user", "content": content}]}
                )
            )
            if n % 5 == 0:
                rows = [line(f"c{i}", "chat", f"{marker} line {n} {i} [[slow:0.2]]") for i in range(60)]
                submitted.append(batches.submit(write_jsonl(tmp_path / f"b{n}.jsonl", rows)).batch)
            time.sleep(2)  # the traffic's pace, not a wait for anything
        assert all(handle.get(timeout=60).ok for handle in singles)
        finals = [wait_final(batches, batch.id, timeout=120) for batch in submitted]
        log = worker.log()
    assert "put back on" not in log
    assert not gaps, f"messages out of their live holder's lease: {gaps}"
    assert all((b.succeeded, b.failed) == (60, 0) for b in finals)
    calls = sorted(
        (c for c in calls_with(stack, marker) if "always limited" in c["prompt"]), key=lambda c: c["t"]
    )
    assert len(calls) >= 5, f"the limited job was called {len(calls)} times in {SOAK_S} s"
    for before, after in itertools.pairwise(calls):
        assert after["t"] >= before["t_end"] + 2 - 0.01, (before, after)  # one at a time, Retry-After kept
