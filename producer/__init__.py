"""Producer side of routerq: `Producer` for services, `enqueue` for scripts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from producer.api import JobHandle, Producer
from routerq.jobs import JobKind

__all__ = ["JobHandle", "Producer", "enqueue"]

_default: Producer | None = None


def enqueue(body: Mapping[str, Any], *, kind: JobKind | str = JobKind.CHAT, **options: Any) -> JobHandle:
    """Queue a job with a process-wide Producer configured from the environment."""
    global _default
    if _default is None:
        _default = Producer()
    return _default.enqueue(body, kind=kind, **options)
