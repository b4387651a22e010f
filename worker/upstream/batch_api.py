"""OpenRouter's Batch API: submit one upstream batch, read it back (routerq.core.upstream_batch).

The official `openai` client speaks OpenAI's file-based batches, not OpenRouter's inline ones, so
this is plain HTTP. The body is built with `endpoint` and `model` before `requests`: OpenRouter
stream-parses it and refuses it otherwise.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2

from routerq.core.errors import UpstreamBatchError
from routerq.core.jobs import JobError
from routerq.core.redaction import redact
from routerq.core.settings import Settings
from routerq.worker.upstream.openrouter import retry_after

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# The first look after a submission: a small batch can be done in seconds. Later looks double, up
# to POLL_MAX_S: OpenRouter's median batch takes minutes, and a look a minute costs next to nothing.
POLL_FIRST_S = 2.0
POLL_MAX_S = 60.0


def next_poll_s(polls: int) -> float:
    """When to look again at an upstream batch after `polls` looks."""
    return min(POLL_MAX_S, POLL_FIRST_S * 2.0 ** min(polls, 10))


def parse_result(item: dict[str, Any] | None) -> dict[str, Any] | JobError:
    """One request's result in a completed batch: the endpoint's answer, or why there is none."""
    response = (item or {}).get("response")
    response = response if isinstance(response, dict) else {}
    body = response.get("body")
    if item is not None and isinstance(body, dict) and int(response.get("status_code") or 200) < 400:
        return body
    if item is None:
        return JobError(code="http_502", message="OpenRouter's batch returned no result for this request",
                        status_code=502)  # fmt: skip
    raw = item.get("error") or (body or {}).get("error") or {}
    code = raw.get("code") if isinstance(raw, dict) else None
    status_code = code if isinstance(code, int) else response.get("status_code")
    status_code = status_code if isinstance(status_code, int) else None
    message = str(raw.get("message") if isinstance(raw, dict) else raw) or "no result from OpenRouter's batch"
    return JobError(
        code=f"http_{status_code}" if status_code else "upstream_error",
        message=message,
        status_code=status_code,
    )


class OpenRouterBatches:
    def __init__(self, settings: Settings, upstream: httpx2.AsyncBaseTransport | None = None) -> None:
        """`upstream` replaces the HTTP transport (in-process tests)."""
        self._url = settings.batches_url
        self._secrets = settings.secrets
        headers = {
            "Authorization": f"Bearer {settings.api_key}",
            "X-OpenRouter-Title": settings.openrouter_app_title,
        }
        if settings.openrouter_http_referer:
            headers["HTTP-Referer"] = settings.openrouter_http_referer
        timeout = httpx2.Timeout(settings.openrouter_timeout, connect=min(10.0, settings.openrouter_timeout))
        self._client = httpx2.AsyncClient(headers=headers, timeout=timeout, transport=upstream)

    async def submit(self, endpoint: str, model: str, requests: list[dict[str, Any]]) -> dict[str, Any]:
        body = json.dumps({"endpoint": endpoint, "model": model, "requests": requests}, separators=(",", ":"))
        return await self._send(
            "POST", self._url, content=body.encode(), headers={"Content-Type": "application/json"}
        )

    async def get(self, upstream_id: str) -> dict[str, Any]:
        return await self._send("GET", f"{self._url}/{upstream_id}")

    async def _send(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._client.request(method, url, **kwargs)
        except httpx2.HTTPError as exc:
            raise UpstreamBatchError(None, redact(f"cannot reach OpenRouter: {exc}", self._secrets)) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            message = str(error.get("message")) if isinstance(error, dict) else response.text[:500]
            raise UpstreamBatchError(
                response.status_code, redact(message, self._secrets), retry_after(response.headers)
            )
        return body

    async def aclose(self) -> None:
        await self._client.aclose()
