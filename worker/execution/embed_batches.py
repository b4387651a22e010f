"""An embedding backfill's requests as OpenRouter batches (`routerq embed --via batch`): submit one
upstream batch of requests, poll it until it ends, and store each result's vectors as a live
request's are stored (counts, tokens, cost).

As for batch lines (execution.upstream_batches), one message carries one upstream batch, its state
lives in Redis under the run (routerq.core.upstream_batch) so any worker takes over after a death, and
polls are the message re-published with a countdown. The texts of a submitted request stay claimed for
the upstream batch's whole window (CLAIM_S): running the same `routerq embed` command again while it
is out does not send them twice.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

from celery import Celery
from openinference.semconv.trace import OpenInferenceSpanKindValues, SpanAttributes
from opentelemetry import context as otel_context
from opentelemetry.trace import Status, StatusCode

from routerq.core import telemetry
from routerq.core.broker import EMBED_UPSTREAM_BATCH_TASK_NAME
from routerq.core.embed_store import EmbedRun
from routerq.core.errors import UpstreamBatchError
from routerq.core.jobs import JobError, JobKind
from routerq.core.upstream_batch import BATCH_ENDPOINTS, ChunkStatus, embed_owner, new_chunk_id
from routerq.core.vectors import to_float32
from routerq.worker.execution.pool import Delivery
from routerq.worker.execution.republish import republish
from routerq.worker.execution.runtime import Runtime
from routerq.worker.execution.upstream_batches import look_at
from routerq.worker.tracing.upstream_batch_span import mapping, upstream_batch_span
from routerq.worker.upstream.batch_api import POLL_FIRST_S, TERMINAL, next_poll_s, parse_result
from routerq.worker.upstream.retry import RETRYABLE_STATUS, Action, Tries, decide

log = logging.getLogger(__name__)

# OpenRouter's 24 h window, and time to poll after it: texts out in an upstream batch are not sent again.
CLAIM_S = 26 * 3600.0
ENDPOINT = BATCH_ENDPOINTS[JobKind.EMBEDDING]
EMBED_RUN = "routerq.embed.run"


async def run_embed_upstream_batch(
    rt: Runtime,
    delivery: Delivery,
    run_id: str,
    chunk_id: str,
    requests: list[list[int]],
    enqueued_at: float,
    tries: dict[str, float] | None = None,
    attempt: int = 1,
) -> dict[str, Any]:
    """One step of one upstream batch of embedding requests: submit it, or look at it once."""
    run = await rt.embeddings.get(run_id)
    if run is None:
        log.warning("embedding run %s has expired; dropping its upstream batch %s", run_id, chunk_id)
        return {"run": run_id, "chunk": chunk_id, "status": "missing"}
    state = await rt.chunks.get(embed_owner(run_id), chunk_id)
    args = [run_id, chunk_id, requests, enqueued_at]
    if not state.get("upstream_id"):
        return await _submit(rt, delivery, run, chunk_id, requests, args, Tries.load(tries), attempt, state)
    return await _poll(rt, delivery, run, chunk_id, state, args, attempt)


async def _submit(
    rt: Runtime,
    delivery: Delivery,
    run: EmbedRun,
    chunk_id: str,
    requests: list[list[int]],
    args: list[Any],
    tries: Tries,
    attempt: int,
    state: dict[str, str],
) -> dict[str, Any]:
    owner = embed_owner(run.id)
    sent: list[list[int]] = []
    for indexes in requests:
        taken = await rt.embeddings.claim(run.id, indexes, owner=chunk_id, hold=CLAIM_S)
        if taken:
            sent.append(taken)
    if not sent:  # every text has its vector, or another request has it out
        await rt.chunks.set(owner, chunk_id, ChunkStatus.DONE)
        return {"run": run.id, "chunk": chunk_id, "status": "nothing to send"}
    if state.get("status") == ChunkStatus.SUBMITTING:
        log.warning(
            "embedding run %s: upstream batch %s was being submitted when its worker stopped; OpenRouter "
            "may have it already (it has no idempotency key): submitting again", run.id, chunk_id,
        )  # fmt: skip
    payload = [
        {"custom_id": str(i), "body": _body(run, await rt.embeddings.texts(run.id, taken))}
        for i, taken in enumerate(sent)
    ]
    now = time.time()
    await rt.chunks.set(owner, chunk_id, ChunkStatus.SUBMITTING, submitting_at=now, sent=json.dumps(sent))
    try:
        created = await rt.batch_api.submit(ENDPOINT, run.model, payload)
    except UpstreamBatchError as exc:
        error = JobError(code="upstream_batch_refused", message=exc.message, status_code=exc.status_code)
        decision = decide(error, exc.retry_after, tries, rt.settings, time.time())
        if decision.action is Action.RETRY:
            await rt.chunks.set(owner, chunk_id, ChunkStatus.NEW)
            kwargs = {"tries": tries.after(decision).dump(), "attempt": attempt}
            await republish(rt, delivery, args, kwargs, decision.delay)
            return {"run": run.id, "chunk": chunk_id, "status": "retrying submit"}
        texts = [index for taken in sent for index in taken]
        await rt.embeddings.record_failure(run.id, texts)
        log.warning("embedding run %s: OpenRouter refused %d text(s): %s", run.id, len(texts), exc.message)
        await rt.chunks.set(owner, chunk_id, ChunkStatus.DONE, upstream_status="refused")
        refused = {"status": "refused", "model": run.model, "request_counts": {"total": len(sent)}}
        with upstream_batch_span(refused, "", now, run.id, run.project, {EMBED_RUN: run.id}) as parent:
            _failed_request_span(parent, run, texts, error, now, now)
        return {"run": run.id, "chunk": chunk_id, "status": "refused"}
    upstream_id = str(created["id"])
    await rt.chunks.set(
        owner, chunk_id, ChunkStatus.SUBMITTED, upstream_id=upstream_id, submitted_at=time.time(),
        endpoint=ENDPOINT, model=run.model, upstream_status=str(created.get("status") or "validating"),
    )  # fmt: skip
    log.info("embedding run %s: %d request(s) sent as OpenRouter batch %s", run.id, len(sent), upstream_id)
    await republish(rt, delivery, args, {"attempt": attempt}, POLL_FIRST_S)
    return {"run": run.id, "chunk": chunk_id, "status": "submitted", "upstream_id": upstream_id}


def _body(run: EmbedRun, texts: list[str | None]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": run.model,
        "input": [t or "" for t in texts],
        "encoding_format": "base64",
    }
    if run.dimensions:
        body["dimensions"] = run.dimensions
    return body


async def _poll(
    rt: Runtime,
    delivery: Delivery,
    run: EmbedRun,
    chunk_id: str,
    state: dict[str, str],
    args: list[Any],
    attempt: int,
) -> dict[str, Any]:
    owner, upstream_id = embed_owner(run.id), state["upstream_id"]
    found, status, polls = await look_at(rt, owner, chunk_id, upstream_id, state)
    if status not in TERMINAL:
        await republish(rt, delivery, args, {"attempt": attempt}, next_poll_s(polls))
        return {"run": run.id, "chunk": chunk_id, "status": status}
    sent: list[list[int]] = json.loads(state.get("sent") or "[]")
    submitted_at = float(state.get("submitted_at") or time.time())
    with upstream_batch_span(
        found, upstream_id, submitted_at, run.id, run.project, {EMBED_RUN: run.id}
    ) as parent:
        if status == "completed":
            again = await _store_results(rt, run, sent, found, parent, submitted_at)
        else:
            log.warning("embedding run %s: OpenRouter batch %s ended %s", run.id, upstream_id, status)
            again = list(range(len(sent)))
    retry = [index for i in again for index in sent[i]]
    if retry and attempt < rt.settings.max_attempts:
        await rt.embeddings.let_go(run.id, retry)
        rt.app.send_task(
            EMBED_UPSTREAM_BATCH_TASK_NAME, args=[run.id, new_chunk_id(), [sent[i] for i in again], args[3]],
            kwargs={"attempt": attempt + 1}, queue=rt.settings.queue, ignore_result=True,
        )  # fmt: skip
    elif retry:
        await rt.embeddings.record_failure(run.id, retry)
    await rt.chunks.set(owner, chunk_id, ChunkStatus.DONE, upstream_status=status, done_at=time.time())
    return {"run": run.id, "chunk": chunk_id, "status": status, "again": len(again)}


async def _store_results(
    rt: Runtime,
    run: EmbedRun,
    sent: list[list[int]],
    found: dict[str, Any],
    parent: otel_context.Context | None,
    submitted_at: float,
) -> list[int]:
    """Each answered request's vectors stored; returns the requests to send again (retryable errors).
    A request that failed for good fails its texts: the same command run again retries them."""
    results = {str(r.get("custom_id")): r for r in found.get("results") or [] if isinstance(r, dict)}
    finished = float(found.get("finalized_at") or time.time())
    again: list[int] = []
    for i, indexes in enumerate(sent):
        parsed = parse_result(results.get(str(i)))
        if isinstance(parsed, JobError):
            _failed_request_span(parent, run, indexes, parsed, submitted_at, finished)
            if (parsed.status_code or 0) in RETRYABLE_STATUS:
                again.append(i)
            else:
                await rt.embeddings.record_failure(run.id, indexes)
                log.warning("embedding run %s: %d text(s) failed: %s", run.id, len(indexes), parsed.message)
            continue
        vectors = {indexes[int(d["index"])]: _float32(d["embedding"]) for d in parsed.get("data") or []}
        usage = mapping(parsed.get("usage"))
        tokens, cost = int(usage.get("prompt_tokens") or 0), float(usage.get("cost") or 0.0)
        await rt.embeddings.store_vectors(run.id, vectors, tokens, cost)
    return again


def _float32(embedding: str | list[float]) -> bytes:
    """A vector as raw little-endian float32 (routerq.core.vectors), from base64 or a JSON list."""
    if isinstance(embedding, str):
        return base64.b64decode(embedding)
    return to_float32(embedding)


def _failed_request_span(
    parent: otel_context.Context | None,
    run: EmbedRun,
    indexes: list[int],
    error: JobError,
    started: float,
    finished: float,
) -> None:
    """Every failed request is in Phoenix, under its upstream batch's span."""
    if parent is None:
        return
    span = telemetry.tracer().start_span(
        "CreateEmbeddingResponse",
        context=parent,
        start_time=int(started * 1e9),
        attributes={
            SpanAttributes.OPENINFERENCE_SPAN_KIND: OpenInferenceSpanKindValues.EMBEDDING.value,
            SpanAttributes.EMBEDDING_MODEL_NAME: run.model,
            SpanAttributes.SESSION_ID: run.id,
            EMBED_RUN: run.id,
            "routerq.embed.texts": len(indexes),
            "routerq.embed.first_index": indexes[0] if indexes else -1,
            "http.status_code": error.status_code or 0,
        },
    )
    span.set_status(Status(StatusCode.ERROR, error.message))
    span.end(end_time=int(finished * 1e9))


def register(app: Celery) -> None:
    app.task(name=EMBED_UPSTREAM_BATCH_TASK_NAME)(run_embed_upstream_batch)
