"""The middle tier: routerq's stores, scripts, limiter and task bodies driven in-process against a real
redis-server (started once per session, as arq's tests do; flushed before each test), with the upstream
answered from a table over HTTP transport objects. No worker process, no Phoenix, no network."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx2
import pytest
import redis

from routerq.core.settings import Settings
from routerq.devstack.localstack import Service, free_port, start_redis

T = TypeVar("T")


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


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """One test's coroutine on a fresh loop (clients made inside it belong to that loop)."""

    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def settings_for(redis_url: str, **overrides: Any) -> Settings:
    """Settings at routerq's defaults (nothing read from the environment), pointed at the test Redis."""
    values: dict[str, Any] = {
        "REDIS_URL": redis_url,
        "OPENROUTER_API_KEY": "sk-or-v1-integration-test-key",
        "OPENROUTER_BASE_URL": "http://upstream.test/api/v1",
        "ROUTERQ_TRACING": "false",
        **overrides,
    }
    return Settings(**values)


@dataclass
class Answer:
    status: int = 200
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def chat_answer(text: str = "ok", cost: float = 0.0001) -> Answer:
    return Answer(
        200,
        {
            "id": "gen-table",
            "object": "chat.completion",
            "created": 1,
            "model": "table/model",
            "provider": "Table",
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "cost": cost},
        },
    )


def error_answer(status: int, message: str, retry_after: str | None = None) -> Answer:
    headers = {"retry-after": retry_after} if retry_after else {}
    return Answer(status, {"error": {"code": status, "message": message}}, headers)


class TableUpstream(httpx2.AsyncBaseTransport):
    """OpenRouter answered from a table: the prompt's text picks the answers, given in order (the last
    repeats). Every request is kept, so a test can say how many calls went upstream."""

    def __init__(self, table: dict[str, list[Answer]]) -> None:
        self.table = table
        self.requests: list[dict[str, Any]] = []

    def calls_for(self, marker: str) -> int:
        return sum(marker in json.dumps(r) for r in self.requests)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content or b"{}")
        self.requests.append(body)
        text = json.dumps(body)
        for marker, answers in self.table.items():
            if marker in text:
                answer = answers[min(self.calls_for(marker) - 1, len(answers) - 1)]
                return httpx2.Response(
                    answer.status,
                    headers=answer.headers,
                    content=json.dumps(answer.body).encode(),
                    request=request,
                )
        return httpx2.Response(
            404, json={"error": {"code": 404, "message": "no answer in the table"}}, request=request
        )


@pytest.fixture(autouse=True)
def _isolated(no_routerq_environment: None) -> None:
    """The developer's own routerq variables never reach a test (tests/conftest.py)."""
