"""What every bench run holds: the services it started (stopped in reverse order) and the fake upstream."""

from __future__ import annotations

from typing import Any

import httpx

from devstack.localstack import Service


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
