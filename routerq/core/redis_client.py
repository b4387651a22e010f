"""Redis connections as every routerq component opens them, and the one bytes-to-text helper."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# Retries with backoff capped at 2 s, 20 times: about 30 s, longer than a Redis restart takes.
RECONNECT_RETRIES = 20


def _options() -> dict[str, Any]:
    """One place for connection options, so every component rides out a Redis restart the same way:
    commands wait and retry with backoff (up to about 30 s) instead of failing the job."""
    return {
        "health_check_interval": 30,
        "socket_keepalive": True,
        "socket_connect_timeout": 5,
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }


def connect(url: str) -> redis.Redis:
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=RECONNECT_RETRIES)
    return redis.Redis.from_url(url, retry=retry, **_options())


# A server answering people says "unavailable, retry" within a few seconds instead of riding out an
# outage: one retry, and commands time out (a frozen Redis accepts connections and never answers).
ANSWERING_TIMEOUT_S = 2.0


def connect_answering(url: str) -> redis.Redis:
    """`connect` for `routerq serve`: a command fails within about 2 x ANSWERING_TIMEOUT_S."""
    options = {**_options(), "socket_connect_timeout": ANSWERING_TIMEOUT_S}
    return redis.Redis.from_url(
        url, retry=Retry(ExponentialBackoff(cap=0.2, base=0.1), retries=1),
        socket_timeout=ANSWERING_TIMEOUT_S, **options,
    )  # fmt: skip


def connect_async(url: str, max_connections: int) -> aredis.Redis:
    """`connect` for the worker's event loop, on redis.asyncio. Every line in flight may hold a
    connection for a moment: past `max_connections` a command waits for one rather than failing
    (redis.asyncio's default pool raises at 100)."""
    retry = AsyncRetry(ExponentialBackoff(cap=2.0, base=0.1), retries=RECONNECT_RETRIES)
    pool = aredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=None, retry=retry, **_options()
    )
    return aredis.Redis(connection_pool=pool)


def describe(url: str) -> str:
    """A Redis URL fit for a message: scheme, host, port and database, never its password."""
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else parts.path
    return f"{parts.scheme}://{where}{parts.path if parts.hostname else ''}"


def as_text(value: Any) -> str:
    """A Redis reply as text (clients here do not decode responses, to keep vectors as bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)
