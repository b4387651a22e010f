"""A Celery execution pool that runs every task of the process as a coroutine on one asyncio loop.

Celery stays the engine: its consumer takes messages off Redis, holds at most `--concurrency`
unacknowledged (prefetch), schedules countdowns, and acknowledges a message when its task is done
(late acks). Where the threads pool would hand each message to a thread (one OS thread and one
blocking HTTP call per line in flight), this pool starts a coroutine on the process's loop, so
hundreds of upstream calls wait together at the cost of a few kilobytes each.

Tasks are `async def handler(rt, delivery, *args, **kwargs)`, registered by name (execution.tasks);
`rt` is the process's Runtime, built by the pool at the first task (arq hands its tasks `ctx`). A task
that raises is logged and acknowledged, as Celery acknowledges failed late-ack tasks; a task still
running when the process dies is not acknowledged, so Redis delivers it again (worker.deliveries
bounds how often). A warm shutdown (SIGTERM, one Ctrl-C) waits for running tasks; a cold one
cancels them unacknowledged, so their messages go back to the queue when the connection closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.concurrency.base import BasePool
from celery.signals import task_received
from kombu.asynchronous import get_event_loop

from routerq.core.broker import LINE_TASK_NAME
from routerq.core.settings import Settings
from routerq.worker.execution.holdings import HELD
from routerq.worker.execution.runtime import Runtime, build_runtime

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[Any]]
# Set by a warm shutdown: work already running finishes, work not started yet goes back to the queue.
DRAINING = threading.Event()
# Beyond the job time limit, how long a warm shutdown waits for running tasks to record their outcome.
SHUTDOWN_SLACK_S = 30.0


class Lent:
    """The prefetch a message of n lines borrowed (n - 1; the message itself counts as one), given
    back line by line as its lines end: the consumer fetches more as soon as any line is done, not
    when the message's slowest line is (a whole message held for its straggler left ~15 % of the
    call slots idle at C=64, 200 ms +-20 %)."""

    def __init__(self, give_back: Callable[[int], None], count: int) -> None:
        self._give_back = give_back
        self.count = count

    def line_ended(self) -> None:
        """Called on the pool's loop; at most `count` times gives anything back."""
        if self.count > 0:
            self.count -= 1
            self._give_back(1)

    def rest(self) -> None:
        if self.count > 0:
            count, self.count = self.count, 0
            self._give_back(count)


NOTHING_LENT = Lent(lambda _: None, 0)


@dataclass(frozen=True)
class Delivery:
    """What a task knows of the message that carried it."""

    app: Celery
    task: str
    id: str
    retries: int
    headers: dict[str, Any] = field(default_factory=dict)
    lent: Lent = NOTHING_LENT


def _decode(body: Any, content_type: str) -> tuple[list[Any], dict[str, Any]] | ValueError:
    """A protocol-2 body's args and kwargs; the consumer accepts JSON only, and nothing else is run."""
    if content_type != "application/json":
        return ValueError(f"refusing a {content_type} message")
    try:
        args, kwargs, _embed = json.loads(bytes(body) if isinstance(body, memoryview) else body)
    except (ValueError, TypeError) as exc:
        return ValueError(f"unreadable message body: {exc}")
    return list(args), dict(kwargs)


def _message(callback: Callable[..., Any] | None) -> Any:
    """The kombu message a callback acknowledges (Celery's Request.on_success)."""
    return getattr(getattr(callback, "__self__", None), "message", None)


class AsyncioPool(BasePool):  # type: ignore[misc]  # Celery ships no type information
    body_can_be_buffer = True
    signal_safe = False
    is_green = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings: Settings = self.app.conf.routerq_settings
        self._stop_timeout = settings.job_time_limit + SHUTDOWN_SLACK_S
        self._running: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="routerq-loop", daemon=True)
        self._qos: Any = None
        self._runtime: Runtime | None = None
        task_received.connect(self._note_consumer, weak=False)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def on_start(self) -> None:
        self._thread.start()

    def on_apply(
        self,
        target: Any,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        **_: Any,
    ) -> concurrent.futures.Future[Any]:
        """`args` are what Celery gives its tracer: task name, id, request, body, content type."""
        name, task_id, request, body, content_type, _encoding = args or ()
        if accept_callback is not None:
            accept_callback(os.getpid(), time.monotonic())
        message = _decode(body, content_type)
        lent = Lent(self._give_back, self._lend_slots(name, message))
        future = asyncio.run_coroutine_threadsafe(
            self._execute(name, task_id, request, message, callback, lent), self.loop
        )
        with self._lock:
            self._running.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._running.discard(future)

    def _note_consumer(self, sender: Any = None, **_: Any) -> None:
        """Connected to task_received: the consumer whose prefetch count the pool adjusts."""
        if self._qos is None:
            self._qos = getattr(sender, "qos", None)

    def _lend_slots(self, name: str, message: tuple[list[Any], dict[str, Any]] | ValueError) -> int:
        """A message of n batch lines counts as n toward the prefetch (--concurrency messages): while
        it runs, the consumer may hold n - 1 fewer other messages, so a worker claims about as many
        lines as it has call slots, and leaves the rest on the queue for other workers."""
        if name != LINE_TASK_NAME or isinstance(message, ValueError) or self._qos is None:
            return 0
        lent = min(len(message[0][1]) - 1, max(0, int(self._qos.value or 0) - 1))
        if lent > 0:
            self._qos.decrement_eventually(lent)
        return max(0, lent)

    async def _execute(
        self,
        name: str,
        task_id: str,
        request: dict[str, Any],
        message: tuple[list[Any], dict[str, Any]] | ValueError,
        callback: Callable[..., Any] | None,
        lent: Lent,
    ) -> None:
        started = time.monotonic()
        result: Any = None
        try:
            if isinstance(message, ValueError):
                raise message
            args, kwargs = message
            delivery = Delivery(self.app, name, task_id, int(request.get("retries") or 0), request, lent)
            handler: Handler = self.app.tasks[name].run
            result = await handler(self._runtime_of_loop(), delivery, *args, **kwargs)
        except asyncio.CancelledError:
            log.warning("task %s[%s] cancelled by a cold shutdown; its message goes back", name, task_id)
            raise
        except Exception:
            log.exception("task %s[%s] failed", name, task_id)
        outcome = (False, result, time.monotonic() - started)
        hub = get_event_loop()
        if hub is None or DRAINING.is_set():  # a stopping worker's consumer loop no longer runs
            self._complete(callback, outcome, lent)
        else:  # on the consumer's own thread, waking it: kombu is not shared across threads, and a
            # consumer asleep with its prefetch full must learn at once that it may fetch again
            hub.call_soon(self._complete, callback, outcome, lent)  # type: ignore[no-untyped-call]

    def _runtime_of_loop(self) -> Runtime:
        """Built at the first task, on the loop's thread (its Redis pool and semaphore belong to it)."""
        if self._runtime is None:
            settings: Settings = self.app.conf.routerq_settings
            self._runtime = build_runtime(self.app, settings, self.app.conf.routerq_slots)
        return self._runtime

    def _complete(self, callback: Callable[..., Any] | None, outcome: tuple[Any, ...], lent: Lent) -> None:
        """Acknowledge (Celery's Request.on_success), hold the message until the ack lands, give back
        its slots."""
        if callback is not None:
            callback(outcome)  # Celery schedules the ack on its hub: held until it has landed
            message = _message(callback)
            tag = getattr(message, "delivery_tag", None)
            HELD.done(str(tag) if tag else None, message)
        lent.rest()

    def _give_back(self, count: int) -> None:
        """Prefetch back to the consumer, on its own thread (kombu is not shared across threads)."""
        if self._qos is None:
            return
        hub = get_event_loop()
        if hub is None or DRAINING.is_set() or threading.current_thread() is not self._thread:
            self._qos.increment_eventually(count)
        else:
            hub.call_soon(self._qos.increment_eventually, count)  # type: ignore[no-untyped-call]

    def _wait_running(self, timeout: float) -> None:
        with self._lock:
            running = list(self._running)
        if running:
            log.info("waiting for %d running task(s) to finish", len(running))
            concurrent.futures.wait(running, timeout=timeout)

    def on_stop(self) -> None:
        """Warm shutdown: running tasks finish (bounded by the job time limit), then the loop stops."""
        DRAINING.set()
        self._wait_running(self._stop_timeout)
        self._stop_loop()

    def on_terminate(self) -> None:
        """Cold shutdown: running tasks are cancelled and never acknowledged."""
        with self._lock:
            running = list(self._running)
        for future in running:
            future.cancel()
        self._stop_loop()

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        """Celery asks to kill the process of one job; here every job shares the process: cancel all."""
        self.on_terminate()

    def _stop_loop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()
        info.update({"max-concurrency": self.limit, "running": len(self._running)})
        return info
