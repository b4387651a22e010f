"""A single job that meets rate limits, on a worker at routerq's default retry settings: one call at a
time, each after the Retry-After, no copy of it calling, and a waiting `enqueue --wait` says why."""

from __future__ import annotations

import itertools
import uuid

from conftest import DEFAULT_RETRIES, Stack, calls_with, extra_worker, routerq


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
