"""Helpers of the integration tier (fixtures are in conftest.py): a test's coroutine on a fresh loop,
settings at routerq's defaults, and an upstream that answers from a table."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx2
import redis.asyncio as aredis

from routerq.core.settings import Settings

T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """One test's coroutine on a fresh loop (clients made inside it belong to that loop)."""

    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def on_redis(url: str, use: Callable[[aredis.Redis], Awaitable[T]]) -> T:
    """`use` with a redis.asyncio client of the test Redis, on a fresh loop; the client is closed after."""

    async def main() -> T:
        client = aredis.Redis.from_url(url)
        try:
            return await use(client)
        finally:
            await client.aclose()

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
