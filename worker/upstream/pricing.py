"""Teach Phoenix OpenRouter's prices, so its own cost column works for OpenRouter models.

Phoenix prices LLM spans from its model table at ingestion and ignores `llm.cost.*`; most OpenRouter
slugs are not in that table. Before a model's first call, routerq registers the model's per-token
prices (from OpenRouter's `GET /models`) as a Phoenix custom model, once per model per Phoenix (shared
across workers through Redis). Phoenix loads new models into its pricing cache every few seconds and
prices a span only at ingestion, so span export is held until `settle` seconds after the registration:
the spans wait in the exporter's queue, the lines never wait. Any failure here is a warning.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

import httpx
import redis

from routerq.core import telemetry
from routerq.core.errors import PhoenixError
from routerq.core.settings import Settings
from routerq.worker.upstream.model_prices import ModelPrices

log = logging.getLogger(__name__)

READY_KEY = "routerq:phoenix-price:{endpoint}:{model}"
_CREATE_MODEL = """
mutation($input: CreateModelMutationInput!) { createModel(input: $input) { model { name } } }
"""
# Phoenix lists custom models before built-in ones: the first page holds every custom model of a
# routerq deployment (one per OpenRouter model it has served) several times over.
_CUSTOM_MODELS = "query { generativeModels(first: 1000) { edges { node { name kind } } } }"


class PhoenixPricing:
    def __init__(self, settings: Settings, client: redis.Redis, prices: ModelPrices) -> None:
        self._settings = settings
        self._redis = client
        self._done: set[str] = set()
        self._prices = prices
        self._lock = threading.Lock()
        self._warned = False
        headers = {}
        if settings.phoenix_api_key:
            headers["Authorization"] = f"Bearer {settings.phoenix_api_key.get_secret_value()}"
        self._phoenix = httpx.Client(
            base_url=settings.phoenix_collector_endpoint, headers=headers, timeout=10
        )

    @property
    def enabled(self) -> bool:
        return self._settings.tracing and self._settings.phoenix_pricing

    def known(self, model: str) -> bool:
        """Whether `ensure` has nothing left to do for this model (no I/O: safe on the event loop)."""
        return not self.enabled or model in self._done

    def ensure(self, models: list[str]) -> None:
        """Make sure Phoenix can price every model the job may be served by. Never raises, never sleeps."""
        if not self.enabled:
            return
        for model in models:
            if model in self._done:
                continue
            try:
                with self._lock:
                    if model not in self._done:
                        telemetry.hold_export_until(self._ensure_one(model))
                        self._done.add(model)
            except Exception as exc:  # a Phoenix without this API, or down, must not fail jobs
                self._warn(f"cannot register the price of {model} in Phoenix: {exc}")
                self._done.add(model)

    def _ensure_one(self, model: str) -> float:
        """The time from which Phoenix prices this model's spans (0 when it never will)."""
        key = READY_KEY.format(endpoint=self._settings.phoenix_collector_endpoint, model=model)
        ready_at = self._redis.get(key)
        if ready_at is None:
            price = self._prices.get(model)
            if price is None:
                log.info("routerq: OpenRouter lists no price for %s; Phoenix will show no cost", model)
                return 0.0
            self._register(model, *price)
            ready = time.time() + self._settings.phoenix_pricing_settle
            self._redis.set(key, repr(ready), nx=True, ex=7 * 24 * 3600)
            ready_at = self._redis.get(key)
        return float(ready_at or 0)

    def _register(self, model: str, prompt: float, completion: float) -> None:
        """Create the custom model unless it exists (an earlier run); losing a race to create it (another
        worker, another deployment on the same Phoenix) is fine too."""
        if self._is_custom_model(model):
            return
        payload = {
            "input": {
                "name": model,
                "provider": "openrouter",
                "namePattern": f"^{re.escape(model)}$",
                "costs": [
                    {"tokenType": "input", "costPerMillionTokens": prompt * 1e6, "kind": "PROMPT"},
                    {"tokenType": "output", "costPerMillionTokens": completion * 1e6, "kind": "COMPLETION"},
                ],
            }
        }
        try:
            self._graphql(_CREATE_MODEL, payload)
        except PhoenixError:
            if self._is_custom_model(model):
                return
            raise
        log.info("routerq: registered OpenRouter prices for %s in Phoenix", model)

    def _is_custom_model(self, model: str) -> bool:
        edges = self._graphql(_CUSTOM_MODELS, {})["generativeModels"]["edges"]
        return any(e["node"]["name"] == model and e["node"]["kind"] == "CUSTOM" for e in edges)

    def _graphql(self, query: str, variables: dict[str, Any]) -> Any:
        response = self._phoenix.post("/graphql", json={"query": query, "variables": variables})
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise PhoenixError(body["errors"][0].get("message", "GraphQL error"))
        return body["data"]

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning("routerq: %s (further pricing warnings suppressed)", message)
            self._warned = True
