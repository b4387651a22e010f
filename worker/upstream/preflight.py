"""Start-up checks: refuse to run a worker that would only produce failures."""

from __future__ import annotations

import logging

import httpx

from routerq.core.errors import PreflightError
from routerq.core.settings import Settings

log = logging.getLogger(__name__)
KEY_CHECK_TIMEOUT_S = 15.0  # a slow OpenRouter must not hold a worker's start for long


def check_api_key(settings: Settings) -> None:
    """A missing or rejected key stops the worker at once instead of failing every job.

    OpenRouter unreachable is only a warning: the network may come back, and jobs retry.
    """
    if not settings.api_key:
        raise PreflightError("OPENROUTER_API_KEY is not set")
    try:
        response = httpx.get(
            f"{settings.openrouter_base_url}/key",
            headers={"Authorization": f"Bearer {settings.api_key}"},
            timeout=min(settings.openrouter_timeout, KEY_CHECK_TIMEOUT_S),
        )
    except httpx.HTTPError as exc:
        log.warning("routerq: cannot check OPENROUTER_API_KEY (%s); starting anyway", type(exc).__name__)
        return
    if response.status_code in (401, 403):
        raise PreflightError(
            f"OPENROUTER_API_KEY was rejected by {settings.openrouter_base_url} (HTTP {response.status_code})"
        )
