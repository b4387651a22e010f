"""Producer side of routerq: `Producer` for services, `enqueue` for scripts.

`Producer` (and the Celery it brings) loads on first use: `routerq status` reads batches through
producer.batch_reader and should not pay for it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from routerq.core.jobs import JobKind

if TYPE_CHECKING:
    from routerq.producer.api import JobHandle, Producer

__all__ = ["JobHandle", "Producer", "enqueue"]

_default: Producer | None = None


def __getattr__(name: str) -> Any:
    if name in ("JobHandle", "Producer"):
        from routerq.producer import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enqueue(body: Mapping[str, Any], *, kind: JobKind | str = JobKind.CHAT, **options: Any) -> JobHandle:
    """Queue a job with a process-wide Producer configured from the environment."""
    from routerq.producer.api import Producer

    global _default
    if _default is None:
        _default = Producer()
    return _default.enqueue(body, kind=kind, **options)
