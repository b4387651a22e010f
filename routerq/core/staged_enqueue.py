"""Bulk enqueue: Celery messages built here, staged in a private list, released onto the queue at once.

Staging is pipelined (thousands of messages a round trip); the release is one Lua script, so workers
see every message of a submit or none, and an interrupted submit leaves nothing half-enqueued.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import redis
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from routerq.core import envelope, telemetry
from routerq.core.batch_store import batch_key
from routerq.core.broker import LINE_TASK_NAME, LINES_PER_MESSAGE, UPSTREAM_BATCH_TASK_NAME
from routerq.core.lua import lua_script
from routerq.core.settings import Settings
from routerq.core.upstream_batch import new_chunk_id

# Work items (lines, embedding requests) per pipelined round trip while staging: large enough to
# amortize the round trip, small enough that a pipeline (messages plus the lines' inputs) stays a
# few MB whatever the file's size.
STAGE_CHUNK = 2000
STAGING_TTL_S = 24 * 3600  # a submit that died mid-staging leaves a list that cleans itself up

_RELEASE = lua_script("routerq.core", "staged_release")


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """`itertools.batched` (Python 3.12) for 3.11."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


class StagedEnqueue:
    """Messages for one owner record (a batch, an embedding run), staged under `{owner}:{part}`."""

    def __init__(
        self, client: redis.Redis, settings: Settings, owner_key: str, part: str = "staging"
    ) -> None:
        self._redis = client
        self._queue = settings.queue
        self._ttl = settings.result_ttl
        self._staging = f"{owner_key}:{part}"
        self._owner = owner_key
        self._pending: list[str] = []
        self._items = 0
        self._extra: list[Callable[[Any], None]] = []
        client.delete(self._staging)

    def add(
        self,
        task: str,
        args: list[Any],
        span: tuple[str, dict[str, Any]] | None = None,
        also: Callable[[Any], None] | None = None,
        items: int = 1,
    ) -> None:
        """Queue one message (carrying `items` work items) for staging, starting a trace for it when
        `span` (name, attributes) is given; `also` adds commands to the same pipeline (its inputs)."""
        self._pending.append(self._message(task, args, span))
        self._items += items
        if also is not None:
            self._extra.append(also)
        if self._items >= STAGE_CHUNK:
            self.flush()

    def add_lines(self, batch_id: str, lines: Iterable[tuple[int, str | None]], enqueued_at: float) -> int:
        """Batch lines, LINES_PER_MESSAGE to a message; a line's stored input (when given) is written in
        the same pipeline as its message. Returns how many lines were staged."""
        inputs_key, ttl = batch_key(batch_id, "in"), self._ttl
        count = 0
        for chunk in batched(lines, LINES_PER_MESSAGE):
            inputs = {str(index): stored for index, stored in chunk if stored is not None}

            def store(pipe: Any, inputs: dict[str, str] = inputs) -> None:
                pipe.hset(inputs_key, mapping=inputs)
                pipe.expire(inputs_key, ttl)

            # No span per line here: the worker opens each line's trace, dated from `enqueued_at`.
            args = [batch_id, [i for i, _ in chunk], enqueued_at]
            self.add(LINE_TASK_NAME, args, also=store if inputs else None, items=len(chunk))
            count += len(chunk)
        return count

    def add_inputs(self, batch_id: str, inputs: dict[str, str]) -> None:
        """Store lines' inputs with the next flush, without a message (they travel in chunks, below)."""
        if not inputs:
            return
        inputs_key, ttl = batch_key(batch_id, "in"), self._ttl

        def store(pipe: Any) -> None:
            pipe.hset(inputs_key, mapping=inputs)
            pipe.expire(inputs_key, ttl)

        self._extra.append(store)
        self._items += len(inputs)
        if self._items >= STAGE_CHUNK:
            self.flush()

    def add_upstream_batch(self, batch_id: str, indexes: list[int], enqueued_at: float) -> None:
        """One upstream batch's lines (routerq.core.upstream_batch), as one message."""
        self.add(UPSTREAM_BATCH_TASK_NAME, [batch_id, new_chunk_id(), indexes, enqueued_at])

    def flush(self) -> None:
        if not self._pending:
            return
        pipe = self._redis.pipeline(transaction=False)
        for command in self._extra:
            command(pipe)
        pipe.lpush(self._staging, *self._pending)
        pipe.expire(self._staging, STAGING_TTL_S)
        pipe.execute()
        self._pending.clear()
        self._extra.clear()
        self._items = 0

    def release(self, start: bool = True, watch: tuple[str, str] | None = None) -> int:
        """All staged messages onto the queue at once. `start` marks the owner in progress; `watch`
        (set key, member) registers the owner with whatever sweeps that set, atomically with it."""
        self.flush()
        keys = [self._staging, self._queue, self._owner]
        args: list[Any] = [time.time(), int(start)]
        if watch is not None:
            keys.append(watch[0])
            args.append(watch[1])
        # EVAL, not a cached EVALSHA: a Redis restarted mid-submit has lost its script cache, and
        # this runs once per submit.
        return int(self._redis.eval(_RELEASE, len(keys), *keys, *args))

    def _message(self, task: str, args: list[Any], span: tuple[str, dict[str, Any]] | None) -> str:
        """A Celery protocol-2 message as kombu's Redis transport stores it."""
        task_id = uuid.uuid4().hex
        headers = envelope.headers(task, task_id, args)
        if span is not None:
            name, attributes = span
            started = telemetry.tracer().start_span(
                name, context=otel_context.Context(), attributes=attributes
            )
            propagate.inject(headers, context=trace.set_span_in_context(started))
            started.end()
        return envelope.build(task_id, headers, args, self._queue)
