"""Calls made untraced and traced afterwards, from a recording, only when their trace is kept.

Most successful batch lines are sampled out (worker.trace_budget), yet OpenInference builds each call's
LLM span in full before the sampler can drop it: a fifth of a worker's CPU at 64 calls in flight. So a
line the budget would drop is called with instrumentation suppressed while the transport records its
raw answer. If the line turns out to need its trace (it failed, was retried or slow, or the budget has
room after all), the call is replayed: the same request goes through the instrumented client again and
the transport answers it from the recording instead of the network. OpenInference thus writes exactly
the span it would have written; the tail sampler re-dates it to the real call's times.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import httpx2
from opentelemetry import context as otel_context


@dataclass
class Recording:
    """One call's raw HTTP answer (before routerq's normalizing), or the transport error it raised."""

    started: float = 0.0  # epoch seconds
    finished: float = 0.0
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    content: bytes = b""
    error: httpx2.TransportError | None = None

    def keep(self, response: httpx2.Response) -> None:
        self.status, self.headers, self.content = (
            response.status_code,
            list(response.headers.items()),
            response.content,
        )

    def answer(self, request: httpx2.Request) -> httpx2.Response:
        """What the recorded call got, for the same request."""
        if self.error is not None:
            raise self.error
        if not self.status:  # cut off before any answer (ROUTERQ_JOB_TIME_LIMIT)
            raise httpx2.ReadTimeout("no answer within the job's time limit", request=request)
        return httpx2.Response(self.status, headers=self.headers, content=self.content, request=request)


RECORDING: ContextVar[Recording | None] = ContextVar("routerq_recording", default=None)
REPLAYING: ContextVar[Recording | None] = ContextVar("routerq_replaying", default=None)


@contextmanager
def untraced(recording: Recording) -> Iterator[None]:
    """Calls inside make no spans (OpenInference honours OpenTelemetry's suppression key) and are
    recorded."""
    token = otel_context.attach(otel_context.set_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY, True))
    recorded = RECORDING.set(recording)
    try:
        yield
    finally:
        RECORDING.reset(recorded)
        otel_context.detach(token)


@contextmanager
def replaying(recording: Recording) -> Iterator[None]:
    """Calls inside are answered from `recording`; nothing goes upstream."""
    token = REPLAYING.set(recording)
    try:
        yield
    finally:
        REPLAYING.reset(token)
