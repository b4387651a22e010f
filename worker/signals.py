"""How a task run ends early on purpose: control flow between the worker's rooms, not errors a user sees.

They derive from `WorkerSignal`, not from `routerq.core.errors.RouterqError`: none of them reaches a
caller of routerq, and an `except RouterqError` must never swallow one. A leaf module, so every room
may raise or catch them.
"""

from __future__ import annotations


class WorkerSignal(Exception):
    """Base of the worker's internal control-flow signals."""


class Deferred(WorkerSignal):
    """A wait too long to hold the slot for (the shared limiter, a batch's budget): re-publish instead."""

    def __init__(self, delay: float, what: str = "shared limiter") -> None:
        super().__init__(f"{what}: waiting {delay:.1f} s")
        self.delay = delay
        self.what = what


class Republished(WorkerSignal):
    """This run of the task ends here: the work was re-published and goes on in another run."""


class NotStarted(WorkerSignal):
    """A warm shutdown began while the attempt waited for a call slot: it goes back to the queue."""


class Halted(WorkerSignal):
    """The guard (asked with the slot held, right before the call) says this call must not happen;
    `verdict` is the guard's, for the caller to act on."""

    def __init__(self, verdict: int) -> None:
        super().__init__(f"call halted by its guard ({verdict})")
        self.verdict = verdict
