"""What every bench run holds: the services it started (stopped in reverse order) and the fake upstream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from routerq.devstack.localstack import Service, free_port, start_fake_openrouter, start_redis


class Services:
    fake: Service

    def __init__(self) -> None:
        self.services: list[Service] = []

    def _keep(self, service: Service) -> Service:
        self.services.append(service)
        return service

    def close(self) -> None:
        for service in reversed(self.services):
            service.stop()

    @property
    def fake_base(self) -> str:
        return self.fake.url.removesuffix("/api/v1")

    def fake_calls(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.fake_base}/_fake/calls", timeout=60).json()["calls"])

    def reset_fake(self) -> None:
        httpx.post(f"{self.fake_base}/_fake/reset").raise_for_status()


class UpstreamStack(Services):
    """Redis and the fake upstream, and the settings a worker needs to use them; a benchmark adds its
    span collector (a discarding sink, or Phoenix) and its endpoint to `env`."""

    def __init__(self, tmp: Path, key: str) -> None:
        super().__init__()
        self.tmp = tmp
        self.redis = self._keep(start_redis(free_port(), tmp / "redis"))
        self.fake = self._keep(start_fake_openrouter(free_port(), tmp, keys=[key]))
        self.env = {
            "REDIS_URL": self.redis.url,
            "OPENROUTER_API_KEY": key,
            "OPENROUTER_BASE_URL": self.fake.url,
            "PHOENIX_DISCOVER_CONFIG": "false",
        }

    def configure(self, latency_ms: float) -> None:
        """The fake's latency (+-20 %), and an empty call log."""
        config = {"latency_ms": latency_ms, "jitter": 0.2}
        httpx.post(f"{self.fake_base}/_fake/config", json=config).raise_for_status()
        self.reset_fake()
