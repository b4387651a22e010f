"""Single-job results: each job's outcome in Redis, written by workers and read by producers.

Keys:
  routerq:result:{job_id}          string  the outcome (JobResult JSON), kept ROUTERQ_RESULT_TTL
  routerq:jobs:pending:{queue}     zset    job ids queued and not finished yet, by enqueue time
  routerq:job:{job_id}:in          string  the job itself while pending, so a lost message can be re-sent
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
import redis.asyncio as aredis

from routerq.core.counters import COUNTERS_KEY
from routerq.core.errors import ResultTimeoutError
from routerq.core.jobs import Job, JobResult
from routerq.core.lua import lua_script
from routerq.core.redis_client import as_text

RESULT_KEY = "routerq:result:{job_id}"
PENDING_KEY = "routerq:jobs:pending:{queue}"
INPUT_KEY = "routerq:job:{job_id}:in"
DONE_KEY = "routerq:job:{job_id}:done"
DONE_TTL_S = 60  # a waiter that comes later than this finds the result itself
WAIT_SLICE_S = 1.0  # a waiter re-reads the result at least this often (another waiter took the signal)

_PUT = lua_script("routerq.core", "result_put")


class ResultStore:
    def __init__(self, client: redis.Redis, ttl: int, queue: str) -> None:
        self._redis = client
        self._ttl = ttl
        self._pending = PENDING_KEY.format(queue=queue)

    def pend(self, job: Job, pipe: redis.client.Pipeline) -> None:
        """Record the job as queued, in the transaction that publishes its message: the lost-message
        sweep re-sends a pending job whose message Redis lost."""
        pipe.set(INPUT_KEY.format(job_id=job.id), job.model_dump_json(), ex=self._ttl)
        pipe.zadd(self._pending, {job.id: time.time()})

    def pending(self, older_than: float) -> list[str]:
        ids = self._redis.zrangebyscore(self._pending, "-inf", time.time() - older_than)
        return [as_text(i) for i in ids]

    def pending_job(self, job_id: str) -> Job | None:
        raw = self._redis.get(INPUT_KEY.format(job_id=job_id))
        return Job.model_validate_json(raw) if raw else None

    def unpend(self, job_id: str) -> None:
        self._redis.zrem(self._pending, job_id)

    def get(self, job_id: str) -> JobResult | None:
        raw = self._redis.get(RESULT_KEY.format(job_id=job_id))
        return JobResult.model_validate_json(raw) if raw else None

    def known(self, job_id: str) -> bool:
        """Whether this Redis has the job: its result, or its pending record (kept while it runs)."""
        return bool(self._redis.exists(RESULT_KEY.format(job_id=job_id), INPUT_KEY.format(job_id=job_id)))

    def wait(
        self, job_id: str, timeout: float | None, every_slice: Callable[[], None] | None = None
    ) -> JobResult:
        """Block on the job's done signal (BLPOP), so the result is read the moment it is stored.
        `every_slice` runs about every WAIT_SLICE_S while there is none (a waiter's progress report)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            result = self.get(job_id)
            if result is not None:
                return result
            left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
            if left <= 0:
                raise ResultTimeoutError(f"job {job_id} has no result after {timeout} s")
            self._redis.blpop([DONE_KEY.format(job_id=job_id)], timeout=max(left, 0.01))
            if every_slice is not None:
                every_slice()


class AsyncResultStore:
    """The worker's side of single-job results, on redis.asyncio."""

    def __init__(self, client: aredis.Redis, ttl: int, queue: str) -> None:
        self._redis = client
        self._ttl = ttl
        self._pending = PENDING_KEY.format(queue=queue)
        self._put = client.register_script(_PUT)

    async def get(self, job_id: str) -> JobResult | None:
        raw = await self._redis.get(RESULT_KEY.format(job_id=job_id))
        return JobResult.model_validate_json(raw) if raw else None

    async def put(self, result: JobResult) -> bool:
        """False when an earlier success was kept instead of this failure."""
        keys = [
            RESULT_KEY.format(job_id=result.job_id),
            self._pending,
            INPUT_KEY.format(job_id=result.job_id),
            DONE_KEY.format(job_id=result.job_id),
            COUNTERS_KEY,
        ]
        data = result.model_dump_json(exclude_none=True)
        usage = result.usage
        args: list[str | int] = [
            data, int(result.ok), self._ttl, result.job_id, DONE_TTL_S,
            usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
            repr(usage.cost or 0.0) if usage else "0",
        ]  # fmt: skip
        return bool(await self._put(keys=keys, args=args))
