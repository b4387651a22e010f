"""OpenTelemetry's Celery instrumentation, minus the tasks that trace themselves.

A batch line opens its own root span in the worker (`routerq.line`, starting at its enqueue time), so
a 100,000-line batch costs Phoenix two spans per line instead of four: Phoenix ingests a span in
milliseconds of CPU, and on a small machine that, not the calls, bounds a traced batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry.instrumentation.celery import CeleryInstrumentor as _CeleryInstrumentor

from routerq.core.broker import LINE_TASK_NAME

SELF_TRACED = frozenset({LINE_TASK_NAME})


def _task_name(kwargs: dict[str, Any]) -> str | None:
    task = kwargs.get("task") or kwargs.get("sender")
    return task if isinstance(task, str) else getattr(task, "name", None)


def _unless_self_traced(handler: Callable[..., Any]) -> Callable[..., Any]:
    def handle(*args: Any, **kwargs: Any) -> Any:
        return None if _task_name(kwargs) in SELF_TRACED else handler(*args, **kwargs)

    return handle


class CeleryInstrumentor(_CeleryInstrumentor):
    """Publish and run spans for every task except those in SELF_TRACED."""

    _trace_prerun = _unless_self_traced(_CeleryInstrumentor._trace_prerun)
    _trace_postrun = _unless_self_traced(_CeleryInstrumentor._trace_postrun)
    _trace_before_publish = _unless_self_traced(_CeleryInstrumentor._trace_before_publish)
    _trace_after_publish = staticmethod(_unless_self_traced(_CeleryInstrumentor._trace_after_publish))
    _trace_failure = staticmethod(_unless_self_traced(_CeleryInstrumentor._trace_failure))
    _trace_retry = staticmethod(_unless_self_traced(_CeleryInstrumentor._trace_retry))
