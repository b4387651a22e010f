"""A message a producer builds without Celery is byte for byte the one Celery publishes (apart from
kombu's random delivery tag and the RPC reply address), read back off a real Redis list: a worker cannot tell them apart."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import redis
from harness import settings_for

from routerq.core import envelope
from routerq.core.broker import LINE_TASK_NAME, TASK_NAME
from routerq.worker.execution.app import create_app

BIG_PROMPT = "Summarize this report. " * 4000  # ~90 KB: Celery keeps only ~1 KB of it in argsrepr
ARGUMENTS = {
    "a single job with a large prompt": (
        TASK_NAME,
        [
            {
                "id": "job_1",
                "kind": "chat",
                "body": {"model": "m", "messages": [{"role": "user", "content": BIG_PROMPT}]},
            }
        ],
    ),
    "a job with deep metadata": (
        TASK_NAME,
        [
            {
                "id": "job_2",
                "kind": "chat",
                "body": {"model": "m", "tools": [{"function": {"parameters": {"a": [1]}}}]},
            }
        ],
    ),
    "a message of batch lines": (LINE_TASK_NAME, ["batch_1", list(range(16)), 1733300000.25]),
}


def published_by_celery(
    client: redis.Redis, redis_url: str, task: str, task_id: str, args: list[Any]
) -> dict[str, Any]:
    app = create_app(settings_for(redis_url))
    app.send_task(task, args=args, task_id=task_id, queue="celery-side", ignore_result=True)
    (raw,) = client.lrange("celery-side", 0, -1)
    return dict(json.loads(raw))


@pytest.mark.parametrize("name", ARGUMENTS)
def test_a_message_built_without_celery_is_the_one_celery_publishes(
    name: str, redis_url: str, sync_redis: redis.Redis
) -> None:
    task, args = ARGUMENTS[name]
    theirs = published_by_celery(sync_redis, redis_url, task, "id-1", args)
    ours = json.loads(envelope.build("id-1", envelope.headers(task, "id-1", args), args, "celery-side"))
    for message in (theirs, ours):
        message["properties"].pop("delivery_tag")  # kombu's is a fresh uuid per publish
    # send_task names the publishing app's process for RPC replies; routerq keeps outcomes in its own
    # stores and never reads one, so a producer leaves it empty, as Celery's own as_task_v2 does.
    assert ours["properties"].pop("reply_to") == ""
    theirs["properties"].pop("reply_to")
    assert ours["headers"] == theirs["headers"]
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(base64.b64decode(theirs["body"]))
    assert ours == theirs
    assert len(ours["headers"]["argsrepr"]) < 1100
