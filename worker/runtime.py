"""Per-process worker state: clients are built lazily in each process (after fork), never shared."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import redis
from celery import Celery

from routerq.batch_store import BatchStore
from routerq.embed_store import EmbedStore
from routerq.redis_client import connect
from routerq.result_store import ResultStore
from routerq.settings import Settings
from worker.limiter import SharedLimiter
from worker.openrouter import OpenRouterClient
from worker.pricing import PhoenixPricing


@dataclass
class Runtime:
    settings: Settings
    redis: redis.Redis
    limiter: SharedLimiter
    store: ResultStore
    batches: BatchStore
    embeddings: EmbedStore
    openrouter: OpenRouterClient
    pricing: PhoenixPricing


_runtime: Runtime | None = None
_pid: int | None = None


_lock = threading.Lock()


def runtime(app: Celery) -> Runtime:
    """One per process, shared by its threads; built on first use after fork."""
    global _runtime, _pid
    if _runtime is not None and _pid == os.getpid():
        return _runtime
    with _lock:
        return _build(app)


def _build(app: Celery) -> Runtime:
    global _runtime, _pid
    if _runtime is None or _pid != os.getpid():
        settings: Settings = app.conf.routerq_settings
        client = connect(settings.redis_url)
        _runtime = Runtime(
            settings=settings,
            redis=client,
            limiter=SharedLimiter(client, settings),
            store=ResultStore(client, settings.result_ttl, settings.queue),
            batches=BatchStore(client, settings.result_ttl),
            embeddings=EmbedStore(client, settings.result_ttl),
            openrouter=OpenRouterClient(settings),
            pricing=PhoenixPricing(settings, client),
        )
        _pid = os.getpid()
    return _runtime
