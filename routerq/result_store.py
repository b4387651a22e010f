"""Single-job results: each job's outcome in Redis, written by workers and read by producers.

Keys:
  routerq:result:{job_id}          string  the outcome (JobResult JSON), kept ROUTERQ_RESULT_TTL
  routerq:jobs:pending:{queue}     zset    job ids queued and not finished yet, by enqueue time
  routerq:job:{job_id}:in          string  the job itself while pending, so a lost message can be re-sent
"""

from __future__ import annotations

import time

import redis
import redis.asyncio as aredis

from routerq.errors import ResultTimeoutError
from routerq.jobs import Job, JobResult
from routerq.redis_client import as_text

RESULT_KEY = "routerq:result:{job_id}"
PENDING_KEY = "routerq:jobs:pending:{queue}"
INPUT_KEY = "routerq:job:{job_id}:in"


class ResultStore:
    def __init__(self, client: redis.Redis, ttl: int, queue: str) -> None:
        self._redis = client
        self._ttl = ttl
        self._pending = PENDING_KEY.format(queue=queue)

    def pend(self, job: Job) -> None:
        """Record the job as queued (before its message is published): the lost-message sweep
        re-sends a pending job whose message Redis lost."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(INPUT_KEY.format(job_id=job.id), job.model_dump_json(), ex=self._ttl)
        pipe.zadd(self._pending, {job.id: time.time()})
        pipe.execute()

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

    def wait(self, job_id: str, timeout: float | None) -> JobResult:
        """Poll with a growing interval; jobs take seconds, so this costs a few round trips."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while True:
            result = self.get(job_id)
            if result is not None:
                return result
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeoutError(f"job {job_id} has no result after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)


class AsyncResultStore:
    """The worker's side of single-job results, on redis.asyncio."""

    def __init__(self, client: aredis.Redis, ttl: int, queue: str) -> None:
        self._redis = client
        self._ttl = ttl
        self._pending = PENDING_KEY.format(queue=queue)

    async def get(self, job_id: str) -> JobResult | None:
        raw = await self._redis.get(RESULT_KEY.format(job_id=job_id))
        return JobResult.model_validate_json(raw) if raw else None

    async def put(self, result: JobResult) -> None:
        """A success is final: a redelivered job's later failure never overwrites it."""
        key = RESULT_KEY.format(job_id=result.job_id)
        data = result.model_dump_json(exclude_none=True)
        if not result.ok:
            existing = await self.get(result.job_id)
            if existing is not None and existing.ok:
                return
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(key, data, ex=self._ttl)
        pipe.zrem(self._pending, result.job_id)
        pipe.delete(INPUT_KEY.format(job_id=result.job_id))
        await pipe.execute()
