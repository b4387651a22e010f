"""The fake's provider queue (`queue_latency`): calls slow down as a model's rolling second fills, the
latency a real provider's queue shows before its 429s (bench.rate_discovery's `queue` scenario)."""

from __future__ import annotations

import pytest

from routerq.devstack.fake_upstream import FakeState


@pytest.mark.parametrize(("admitted", "extra"), [(0, 0.0), (50, 0.0), (75, 0.2), (100, 0.4)])
def test_a_queueing_providers_calls_slow_down_from_half_its_limit(admitted: int, extra: float) -> None:
    state = FakeState(keys=set(), rate_limits={"m": 100}, queue_latency={"m": 0.4})
    for _ in range(admitted):
        assert not state.over_rate("m", 1000.0)
    assert state.queue_delay("m") == pytest.approx(extra)


def test_a_model_without_a_limit_or_a_queue_is_never_slowed() -> None:
    state = FakeState(keys=set(), rate_limits={"m": 100}, queue_latency={"q": 0.4})
    for _ in range(100):
        state.over_rate("m", 1000.0)
    assert (state.queue_delay("m"), state.queue_delay("q")) == (0.0, 0.0)
