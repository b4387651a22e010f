"""A batch line's trace: ids chosen at its first attempt, the root span written when the line ends.

The root (`routerq.line`, CHAIN) runs from the line's enqueue to its final outcome and carries it: OK
and the answer, or ERROR and the final error. Every attempt's LLM call is a child of the root, so a
failed attempt stays visible as an ERROR span under a root that may end OK. The ids travel with
retries as a `traceparent`, so every attempt, in whatever process, joins one trace. Spans are held
(worker.tail_sampler) until the attempt ends: a retried or parked line is always kept; a line that
ends is kept when it must be (failed, retried, rate-limited, slow) or when it fits the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from openinference.semconv.trace import SpanAttributes
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags

from routerq.core import telemetry
from routerq.core.spans import output_attribute
from routerq.worker.signals import Republished
from routerq.worker.tracing.tail_sampler import TailSampler
from routerq.worker.upstream.call_record import Recording, replaying

log = logging.getLogger(__name__)

ROOT_NAME = "routerq.line"
_ids = RandomIdGenerator()


def parse_traceparent(traceparent: str | None) -> tuple[int, int] | None:
    parts = traceparent.split("-") if traceparent else []
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        return int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return None


class LineTrace:
    """Context manager around one attempt at a line. Without a sampler (tracing off) it does nothing."""

    def __init__(self, sampler: TailSampler | None, traceparent: str | None, enqueued_at: float) -> None:
        self._sampler = sampler
        ids = parse_traceparent(traceparent)
        self.trace_id, self.span_id = ids or (_ids.generate_trace_id(), _ids.generate_span_id())
        self._enqueued_at = enqueued_at
        self._token: object | None = None
        self._settled = False
        self.attributes: dict[str, Any] = {}  # the root's, gathered as the attempt learns them

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-01"

    @property
    def tracing(self) -> bool:
        return self._sampler is not None

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"

    def __enter__(self) -> LineTrace:
        if self._sampler is not None:
            self._sampler.hold(self.trace_id)
            root = SpanContext(
                self.trace_id, self.span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)
            )
            self._token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(root)))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
        if self._sampler is None or self._settled:
            return
        if isinstance(exc, Republished):  # the next attempt writes the root; this one's spans are kept
            self._settled = True
            self._sampler.settle(self.trace_id, always=True)
        elif exc is not None:
            self.finish(output=repr(exc), error=repr(exc), always=True)
        else:
            self._settled = True
            self._sampler.settle(self.trace_id, always=True)

    def would_drop(self) -> bool:
        """Whether this line's call can be made untraced (worker.call_record): its success would be
        sampled out. Its spans are held all the same: a failure is replayed into them."""
        return self._sampler is not None and self._sampler.would_drop(self.trace_id)

    async def replay(self, recording: Recording | None, call: Callable[[], Awaitable[None]]) -> None:
        """Write the LLM span of a call made untraced: `call` makes it again, answered from
        `recording`, and the span gets the real call's times."""
        if self._sampler is None or recording is None:
            return
        since = self._sampler.held(self.trace_id)
        try:
            with replaying(recording):
                await call()
        except Exception:  # tracing never fails a line: the trace goes without this call's span
            log.warning("routerq: replaying a call for its trace failed", exc_info=True)
            return
        self._sampler.redate(self.trace_id, since, recording.started, recording.finished)

    def decide(self, always: bool, unwritten_calls: int = 0) -> bool:
        """Whether the line's trace goes to Phoenix (the root and `unwritten_calls` still to come)."""
        return self._sampler is not None and self._sampler.decide(self.trace_id, always, 1 + unwritten_calls)

    def finish(
        self,
        *,
        output: str,
        error: str | None = None,
        ok: bool = False,
        always: bool = False,
        kept: bool | None = None,
        project: str | None = None,
    ) -> bool:
        """Write the root with the line's outcome and settle the trace; True when it goes to Phoenix.
        `kept` when already decided (`decide`); a dropped trace's root is never built."""
        if self._sampler is None or self._settled:
            return False
        self._settled = True
        kept = self.decide(always) if kept is None else kept
        if kept:
            with telemetry.chosen_ids(self.trace_id, self.span_id):
                span = telemetry.tracer().start_span(
                    ROOT_NAME,
                    context=otel_context.Context(),
                    start_time=int(self._enqueued_at * 1e9),
                    attributes={**self.attributes, SpanAttributes.OUTPUT_VALUE: output_attribute(output)},
                )
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, error))
            elif ok:
                span.set_status(Status(StatusCode.OK))
            span.end()
        self._sampler.release(self.trace_id, kept, project)
        return kept
