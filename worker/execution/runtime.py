"""Per-process worker state, built on the process's event loop at its first task and handed to each."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import httpx2
import redis.asyncio as aredis
from celery import Celery

from routerq.core.batch_store import AsyncBatchStore
from routerq.core.embed_store import AsyncEmbedStore
from routerq.core.job_chain import AsyncJobChain
from routerq.core.redis_client import connect, connect_async
from routerq.core.result_store import AsyncResultStore
from routerq.core.settings import VISIBILITY_SLACK, Settings
from routerq.core.upstream_batch import AsyncChunkStore
from routerq.worker.tracing.slow_lines import SlowLines
from routerq.worker.upstream.batch_api import OpenRouterBatches
from routerq.worker.upstream.limiter import SharedLimiter
from routerq.worker.upstream.model_prices import ModelPrices
from routerq.worker.upstream.openrouter import OpenRouterClient
from routerq.worker.upstream.pace_waiters import PaceWaiters
from routerq.worker.upstream.pricing import PhoenixPricing


@dataclass
class Runtime:
    app: Celery
    settings: Settings
    redis: aredis.Redis
    limiter: SharedLimiter
    store: AsyncResultStore
    chains: AsyncJobChain
    batches: AsyncBatchStore
    embeddings: AsyncEmbedStore
    openrouter: OpenRouterClient
    batch_api: OpenRouterBatches
    chunks: AsyncChunkStore
    prices: ModelPrices
    pricing: PhoenixPricing
    slots: asyncio.Semaphore  # upstream calls this process may have in flight: its share of --concurrency
    slow_lines: SlowLines
    pace: PaceWaiters  # this process's lines waiting for a model's discovered pace

    async def ensure_priced(self, models: Iterable[str]) -> None:
        """A model's first call registers its price in Phoenix (blocking HTTP): off the loop."""
        wanted = [m for m in models if not self.pricing.known(m)]
        if wanted:
            await asyncio.to_thread(self.pricing.ensure, wanted)


# Redis connections beyond one per call slot: the delivery counter, a retry's bookkeeping, a sweep.
REDIS_HEADROOM = 8


def build_runtime(
    app: Celery, settings: Settings, concurrency: int, upstream: httpx2.AsyncBaseTransport | None = None
) -> Runtime:
    """A process's runtime, built by its pool on the loop's thread and handed to every task (as arq
    hands `ctx`). `upstream` replaces the HTTP transport to OpenRouter (in-process tests)."""
    client = connect_async(settings.redis_url, max_connections=concurrency + REDIS_HEADROOM)
    batches = AsyncBatchStore(client, settings.result_ttl)
    prices = ModelPrices(settings)
    limiter = SharedLimiter(client, settings)
    return Runtime(
        app=app,
        settings=settings,
        redis=client,
        limiter=limiter,
        store=AsyncResultStore(client, settings.result_ttl, settings.queue),
        chains=AsyncJobChain(client, settings.result_ttl),
        batches=batches,
        # a text's claim outlives any call: Celery stops a task at ROUTERQ_JOB_TIME_LIMIT
        embeddings=AsyncEmbedStore(
            client, settings.result_ttl, claim_s=settings.job_time_limit + VISIBILITY_SLACK
        ),
        openrouter=OpenRouterClient(settings, concurrency, upstream),
        batch_api=OpenRouterBatches(settings, upstream),
        chunks=AsyncChunkStore(client, settings.result_ttl),
        prices=prices,
        pricing=PhoenixPricing(settings, connect(settings.redis_url), prices),
        slots=asyncio.Semaphore(concurrency),
        slow_lines=SlowLines(settings.trace_slow_s, batches.latency_p99),
        pace=PaceWaiters(limiter),
    )
