"""Celery protocol-2 messages as kombu's Redis transport stores them: built and read in one place.

Bulk enqueue builds envelopes itself (building each through Celery costs more than the rest of a
submit together); the lost-message sweep reads them back off the queue and the unacked hash.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any


def build(
    task_id: str,
    headers: dict[str, Any],
    args: list[Any],
    queue: str,
    kwargs: dict[str, Any] | None = None,
    delivery_tag: str | None = None,
) -> str:
    """One queued message: `headers` come from Celery's own `as_task_v2`, with this message's id.
    kombu files an unacknowledged message under its delivery tag: a message re-published while the
    one that carried its task is still unacknowledged needs a tag of its own."""
    body = [args, kwargs or {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    envelope = {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": delivery_tag or task_id,
        },
    }
    return json.dumps(envelope)


@dataclass(frozen=True)
class Message:
    task: str
    id: str
    args: list[Any]


def parse(raw: bytes | str) -> Message | None:
    """A queued envelope, or an unacked entry ([envelope, exchange, routing key]); None when the value
    is not a JSON Celery message (kombu's hash holds only those, but a queue may hold anything)."""
    try:
        data = json.loads(raw)
        envelope = data[0] if isinstance(data, list) else data
        headers = envelope["headers"]
        args = json.loads(base64.b64decode(envelope["body"]))[0]
        return Message(task=str(headers["task"]), id=str(headers["id"]), args=list(args))
    except (ValueError, KeyError, IndexError, TypeError):
        return None
