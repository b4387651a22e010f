"""Work a task hands back to the queue: a retry after its countdown, a deferral, or lines a warm
shutdown stopped before their calls. One way for every path, so no path puts work at the wrong end."""

from __future__ import annotations

import uuid
from typing import Any

from routerq.core import envelope
from routerq.core.broker import LINE_TASK_NAME
from routerq.worker.execution.pool import Delivery
from routerq.worker.execution.runtime import Runtime


async def republish(
    rt: Runtime, delivery: Delivery, args: list[Any], kwargs: dict[str, Any], delay: float = 0.0
) -> None:
    """The delivery's task again, with `args` and `kwargs`, due in `delay` seconds. Batch lines go to
    the consumers' end of the queue, where they are taken next and run when their countdown is due:
    kombu would put them behind the batch's whole backlog, and a 100,000-line batch's retried lines
    would all wait for its end, then run (and send their traces to Phoenix) in one burst. Single jobs
    and embedding requests keep Celery's publish (and its span)."""
    if delivery.task == LINE_TASK_NAME:
        await rt.redis.rpush(rt.settings.queue, _front_of_queue(rt, delivery, args, kwargs, delay))
        return
    rt.app.send_task(
        delivery.task,
        args=args,
        kwargs=kwargs,
        task_id=delivery.id,
        retries=delivery.retries + 1,
        countdown=delay,
        queue=rt.settings.queue,
        ignore_result=True,
    )


def _front_of_queue(
    rt: Runtime, delivery: Delivery, args: list[Any], kwargs: dict[str, Any], delay: float
) -> str:
    message = rt.app.amqp.as_task_v2(
        delivery.id,
        delivery.task,
        args=args,
        kwargs=kwargs,
        countdown=delay or None,
        retries=delivery.retries + 1,
        ignore_result=True,
    )
    return envelope.build(
        delivery.id, dict(message.headers), args, rt.settings.queue, kwargs, delivery_tag=uuid.uuid4().hex
    )
