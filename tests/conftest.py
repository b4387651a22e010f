"""Shared by every tier."""

from __future__ import annotations

import os

import pytest

ROUTERQ_VARIABLES = ("ROUTERQ_", "OPENROUTER_", "PHOENIX_", "REDIS_")


@pytest.fixture
def no_routerq_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clears routerq's variables (ROUTERQ_API_KEYS exported as the README suggests, a real key...):
    a unit or integration test sees routerq's defaults, never the developer's environment."""
    for name in list(os.environ):
        if name.startswith(ROUTERQ_VARIABLES):
            monkeypatch.delenv(name)
