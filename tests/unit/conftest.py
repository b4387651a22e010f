"""Unit tests: pure logic, no services, milliseconds each."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated(no_routerq_environment: None) -> None:
    """The developer's own routerq variables never reach a unit test (tests/conftest.py)."""
