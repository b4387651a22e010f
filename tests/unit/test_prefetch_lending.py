"""A message of n batch lines borrows n - 1 prefetch slots and gives them back as its lines end."""

from __future__ import annotations

from routerq.worker.execution.pool import Lent


def test_each_ended_line_gives_one_slot_back_and_the_ack_gives_the_rest() -> None:
    given: list[int] = []
    lent = Lent(given.append, 15)  # a message of 16 lines; the message itself is the 16th slot
    for _ in range(10):
        lent.line_ended()
    assert sum(given) == 10
    lent.rest()
    assert sum(given) == 15


def test_never_more_is_given_back_than_was_lent() -> None:
    given: list[int] = []
    lent = Lent(given.append, 3)
    for _ in range(16):
        lent.line_ended()
    lent.rest()
    assert sum(given) == 3
