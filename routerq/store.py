"""Result store: each job's outcome in Redis, written by workers and read by producers."""

from __future__ import annotations

import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from routerq.jobs import JobResult

RESULT_KEY = "routerq:result:{job_id}"


def connect(url: str) -> redis.Redis:
    """One place for connection options, so every component rides out a Redis restart the same way:
    commands wait and retry with backoff (up to about 30 s) instead of failing the job."""
    return redis.Redis.from_url(
        url,
        health_check_interval=30,
        socket_keepalive=True,
        socket_connect_timeout=5,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=20),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


class ResultStore:
    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self._redis = client
        self._ttl = ttl

    def put(self, result: JobResult) -> None:
        """A success is final: a redelivered job's later failure never overwrites it."""
        key = RESULT_KEY.format(job_id=result.job_id)
        data = result.model_dump_json(exclude_none=True)
        if result.ok:
            self._redis.set(key, data, ex=self._ttl)
            return
        existing = self.get(result.job_id)
        if existing is None or not existing.ok:
            self._redis.set(key, data, ex=self._ttl)

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
                raise TimeoutError(f"job {job_id} has no result after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
