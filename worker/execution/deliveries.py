"""Delivery counting: a message that keeps killing its worker process is failed, not run forever.

A message is delivered again when its worker died mid-run (late acks + reject on worker lost); each
delivery increments a counter keyed by the message (a retry is a new message: its `retries` is one
higher), and past ROUTERQ_MAX_DELIVERIES the job fails as `worker_lost` without another call.
"""

from __future__ import annotations

from routerq.core.batch_store import DELIVERY_KEY_TTL_S
from routerq.core.jobs import JobError
from routerq.worker.execution.pool import Delivery
from routerq.worker.execution.runtime import Runtime


def delivery_key(delivery: Delivery, job_id: str) -> str:
    """One counter per message: a retry is a new message (its `retries` is one higher)."""
    return f"routerq:deliveries:{job_id}:{delivery.id}:{delivery.retries}"


async def over_delivered(rt: Runtime, delivery: Delivery, job_id: str) -> int | None:
    """Counts this delivery; returns the count when it is past the bound, else None."""
    name = delivery_key(delivery, job_id)
    pipe = rt.redis.pipeline(transaction=False)
    pipe.incr(name)
    pipe.expire(name, DELIVERY_KEY_TTL_S)
    count = int((await pipe.execute())[0])
    return count if count > rt.settings.max_deliveries else None


def poison_error(deliveries: int) -> JobError:
    return JobError(
        code="worker_lost",
        message=f"the worker running this job died {deliveries - 1} times (ROUTERQ_MAX_DELIVERIES); "
        "not trying again",
    )
