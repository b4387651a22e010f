"""routerq: LLM work through a Redis queue to OpenRouter, traced end to end in Arize Phoenix.

`from routerq import Producer, enqueue, BatchClient, EmbedClient`. Each loads on first use, so that
`import routerq.<anything>` (a worker process, `routerq status`) does not pay for the producer side.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from routerq.producer import JobHandle, Producer, enqueue
    from routerq.producer.batch_client import BatchClient
    from routerq.producer.embed_client import EmbedClient

__all__ = ["BatchClient", "EmbedClient", "JobHandle", "Producer", "enqueue"]

_HOMES = {
    "Producer": "routerq.producer",
    "JobHandle": "routerq.producer",
    "enqueue": "routerq.producer",
    "BatchClient": "routerq.producer.batch_client",
    "EmbedClient": "routerq.producer.embed_client",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
