"""OpenRouter's per-token prices, from its model list (`GET /models`), for every model it serves."""

from __future__ import annotations

import threading
import time

import httpx

from routerq.core.settings import Settings

PRICES_REFRESH_S = 60.0  # the list is refetched at most this often, for a model it did not hold


class ModelPrices:
    """Thread-safe; blocking HTTP (call it off the event loop)."""

    def __init__(self, settings: Settings) -> None:
        self._client = httpx.Client(base_url=settings.openrouter_base_url, timeout=20)
        self._prices: dict[str, tuple[float, float]] = {}
        self._fetched_at = 0.0
        self._lock = threading.Lock()

    def get(self, model: str) -> tuple[float, float] | None:
        """USD per prompt and per completion token; None for a model OpenRouter lists no price for.
        Raises httpx.HTTPError when the list cannot be read."""
        with self._lock:
            if model not in self._prices and time.time() - self._fetched_at > PRICES_REFRESH_S:
                response = self._client.get("/models")
                response.raise_for_status()
                self._fetched_at = time.time()
                for entry in response.json().get("data", []):
                    pricing = entry.get("pricing") or {}
                    try:
                        self._prices[entry["id"]] = (float(pricing["prompt"]), float(pricing["completion"]))
                    except (KeyError, TypeError, ValueError):
                        continue
            return self._prices.get(model)
