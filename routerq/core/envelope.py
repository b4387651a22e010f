"""Celery protocol-2 messages as kombu's Redis transport stores them: built and read in one place.

Producers build messages here and push them onto the queue themselves: importing Celery to publish one
job cost `routerq enqueue` more than everything else it does, and building each message through Celery
costs a bulk submit more than the rest of it together. Workers read them with Celery; the lost-message
sweep reads them back off the queue and the unacked hash. tests/unit/test_jobs_and_messages.py checks
these headers against Celery's own.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from dataclasses import dataclass
from typing import Any

from routerq.core.argsrepr import safe_repr


def headers(task: str, task_id: str, args: list[Any]) -> dict[str, Any]:
    """The headers Celery's `as_task_v2` gives a task published with `ignore_result=True` (outcomes live
    in routerq's stores) and no eta, expiry, time limits or parent."""
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": safe_repr(args),  # as Celery: bounded, never a second copy of every prompt
        "kwargsrepr": "{}",
        "origin": f"gen{os.getpid()}@{socket.gethostname()}",  # Celery's anon_nodename()
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }


def build(
    task_id: str,
    headers: dict[str, Any],
    args: list[Any],
    queue: str,
    kwargs: dict[str, Any] | None = None,
    delivery_tag: str | None = None,
) -> str:
    """One queued message, with `headers` from `headers` above (or Celery's own `as_task_v2`).
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
