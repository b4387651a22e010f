"""The middle tier: routerq's stores, scripts, limiter and task bodies driven in-process against a real
redis-server (started once per session, as arq's tests do; flushed before each test), with the upstream
answered from a table over HTTP transport objects. No worker process, no Phoenix, no network."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from routerq.devstack.localstack import Service, free_port, start_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = start_redis(free_port(), tmp_path_factory.mktemp("redis"))
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def redis_url(redis_server: Service) -> str:
    redis.Redis.from_url(redis_server.url).flushdb()
    return redis_server.url


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _isolated(no_routerq_environment: None) -> None:
    """The developer's own routerq variables never reach a test (tests/conftest.py)."""
