"""What a worker process's lease holds: a message from its receipt until its acknowledgement has landed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from routerq.worker.execution import holdings as holdings_module
from routerq.worker.execution.holdings import ACK_WAIT_S, Holdings


def received(holdings: Holdings, tag: str) -> SimpleNamespace:
    """A kombu message as Celery's task_received hands it over (its request's `message`)."""
    message = SimpleNamespace(delivery_tag=tag, acknowledged=False)
    holdings.received(SimpleNamespace(message=message))
    return message


def test_a_finished_message_stays_held_until_its_acknowledgement_lands() -> None:
    holdings = Holdings()
    message = received(holdings, "t1")
    holdings.done("t1", message)  # the task returned; Celery's ack is still queued on its hub
    assert holdings.snapshot() == ["t1"]
    message.acknowledged = True
    assert holdings.snapshot() == []


def test_a_message_acknowledged_by_the_time_its_task_ends_is_let_go_at_once() -> None:
    holdings = Holdings()
    message = received(holdings, "t1")
    message.acknowledged = True
    holdings.done("t1", message)
    assert holdings.snapshot() == []


def test_a_message_whose_acknowledgement_never_lands_is_let_go_after_the_ack_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    holdings = Holdings()
    clock = [1000.0]
    monkeypatch.setattr(holdings_module.time, "monotonic", lambda: clock[0])
    message = received(holdings, "t1")
    holdings.done("t1", message)
    clock[0] += ACK_WAIT_S - 1
    assert holdings.snapshot() == ["t1"]
    clock[0] += 2
    assert holdings.snapshot() == []


def test_messages_still_running_are_held_beside_those_awaiting_their_ack() -> None:
    holdings = Holdings()
    received(holdings, "running")
    holdings.done("acking", received(holdings, "acking"))
    assert sorted(holdings.snapshot()) == ["acking", "running"]
