"""The ASGI app of `routerq serve`: OpenAI's Files and Batches endpoints, so the official clients (any
language) submit and follow routerq batches with only `base_url` and `api_key` changed.

An upload is streamed to disk (never whole in memory), counted as it arrives (413 past
ROUTERQ_MAX_UPLOAD_MB, chunked uploads included) and validated like `routerq submit` validates, with
the same codes and line numbers. A batch is made by the same BatchClient `routerq submit` uses: the
same batches, visible to `routerq status`. Blocking work (Redis, files) runs in the thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from typing import IO, Any

import redis
from opentelemetry import propagate
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive

from routerq.api.auth import Tokens
from routerq.api.errors import ApiError, not_found
from routerq.api.file_store import (
    ERROR_PREFIX,
    OUTPUT_PREFIX,
    FileStore,
    StoredFile,
    file_object,
    new_file_id,
)
from routerq.api.index import TenantIndex
from routerq.api.metrics import metrics_text
from routerq.api.objects import batch_object
from routerq.core.batch_format import URLS, BatchLine, parse_json, read_lines, shown, validate
from routerq.core.batch_store import Batch, BatchOrigin, Fallback, Outcome, Via
from routerq.core.errors import BatchError
from routerq.core.printable import printable
from routerq.core.redis_client import connect_answering
from routerq.core.settings import Settings
from routerq.producer.batch_client import BatchClient

FORM_OVERHEAD = 64 * 1024  # multipart headers and the `purpose` field, beyond the file itself
MAX_METADATA_PAIRS = 16  # OpenAI's limits
COMPLETION_WINDOWS = frozenset({"24h"})
DEFAULT_PAGE, MAX_PAGE = 20, 100
FILE_SWEEP_S = 600.0  # how often expired uploads are looked for (they expire after days)
RETRY_AFTER_S = 5  # what a 503 asks clients to wait: a Redis restart takes seconds
BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")
FILE_ID = re.compile(r"file-[0-9a-f]{24}")
_SEPARATORS = re.compile(r"[/\\]")

log = logging.getLogger(__name__)


def clean_filename(name: str) -> str:
    """An upload's name as routerq stores and shows it (routerq.core.printable), without path
    separators."""
    return printable(_SEPARATORS.sub("_", name)) or "upload.jsonl"


class _TooLarge(Exception):
    pass


class _CountingReceive:
    """Counts the request body as it streams in, and stops it past the limit."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self.seen = 0
        self.exceeded = False
        self.complete = False  # the whole body has arrived: nothing is left to drain

    async def __call__(self) -> Message:
        message = await self._receive()
        self.complete = message["type"] != "http.request" or not message.get("more_body")
        self.seen += len(message.get("body", b""))
        if self.seen > self._limit:
            self.exceeded = True
            raise _TooLarge
        return message


# How an OpenAI client asks for OpenRouter's Batch API (half price, within 24 h) instead of live calls:
# `metadata={"routerq_via": "batch"}`, a field every official client already sends.
VIA_METADATA_KEY = "routerq_via"
FALLBACK_METADATA_KEY = "routerq_fallback"  # "live": see `routerq submit --fallback`


def too_large(limit_mb: float) -> ApiError:
    return ApiError(
        413, f"file is larger than {limit_mb:g} MB (ROUTERQ_MAX_UPLOAD_MB)", code="file_too_large"
    )


def create_app(settings: Settings, tokens: Tokens) -> Starlette:
    client = connect_answering(settings.redis_url)
    batches = BatchClient(settings, tracing=settings.tracing, client=client)
    files = FileStore(client, settings.files_dir, settings.result_ttl)
    batch_index = TenantIndex(client, "batches", settings.result_ttl)
    limit = int(settings.max_upload_mb * 1_000_000)

    def tenant_of(request: Request) -> str:
        tenant = tokens.tenant(request.headers.get("authorization"))
        if tenant is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return tenant

    def own_batch(tenant: str, batch_id: str) -> Batch:
        """The batch, when this tenant made it through this API (a `--no-auth` server's tenant too):
        ownership is checked before anything else is read."""
        if not BATCH_ID.fullmatch(batch_id) or not batch_index.owns(tenant, batch_id):
            raise not_found("batch", batch_id)
        batch = batches.store.get(batch_id)
        if batch is None:
            raise not_found("batch", batch_id)
        return batch

    def keep(source: IO[bytes], filename: str, tenant: str) -> StoredFile:
        """Write, validate and record an upload; on any failure its file is removed."""
        file_id = new_file_id()
        path = files.path(file_id)
        try:
            with path.open("wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            size = path.stat().st_size
            if size > limit:
                raise too_large(settings.max_upload_mb)
            validation = validate(path, max_line=settings.max_line_bytes)
            if not validation.ok:
                report = "\n".join(validation.report(filename))
                message = (
                    f"{filename}: {validation.error_count} bad line(s); the file was not stored:\n{report}"
                )
                if any(e.code == "line_too_large" for e in validation.errors):
                    raise ApiError(413, message, code="line_too_large", param="file")
                raise ApiError(400, message, code="invalid_file", param="file")
            stored = StoredFile(id=file_id, bytes=size, filename=filename, purpose="batch", owner=tenant,
                                lines=validation.lines, urls=sorted(validation.urls))  # fmt: skip
            files.add(stored)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return stored

    async def upload_file(request: Request) -> Response:
        tenant = tenant_of(request)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit + FORM_OVERHEAD:
            await _drain(request.receive, int(declared))
            raise too_large(settings.max_upload_mb)
        counting = _CountingReceive(request.receive, limit + FORM_OVERHEAD)
        try:
            form = await Request(request.scope, counting).form(max_files=1, max_fields=8)
        except Exception as exc:
            if counting.exceeded:
                if not counting.complete:
                    await _drain(request.receive, limit)
                raise too_large(settings.max_upload_mb) from None
            raise ApiError(400, f"could not read the multipart upload: {shown(str(exc))}") from None
        try:
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "a `file` part is required", param="file")
            if purpose != "batch":
                raise ApiError(400, f"purpose must be 'batch', got {shown(purpose)}", param="purpose")
            name = clean_filename(upload.filename or "upload.jsonl")
            stored = await run_in_threadpool(keep, upload.file, name, tenant)
        finally:
            await form.close()
        return JSONResponse(stored.openai_object())

    def list_files(request: Request) -> Response:
        tenant = tenant_of(request)
        after, limit_ = _paging(request)
        ids, more = files.index.page(tenant, after, limit_)
        found = [f for f in (files.get(i, tenant) for i in ids) if f is not None]
        return _list([f.openai_object() for f in found], more)

    def output_file(tenant: str, file_id: str) -> tuple[Batch, set[Outcome]]:
        prefix = OUTPUT_PREFIX if file_id.startswith(OUTPUT_PREFIX) else ERROR_PREFIX
        try:
            batch = own_batch(tenant, file_id.removeprefix(prefix))
        except ApiError:
            raise not_found("file", file_id) from None
        wanted = {Outcome.SUCCEEDED} if prefix == OUTPUT_PREFIX else {Outcome.FAILED, Outcome.CANCELLED}
        return batch, wanted

    def output_lines(batch: Batch, wanted: set[Outcome]) -> Iterator[bytes]:
        for _, outcome, raw in batches.store.outputs(batch.id, batch.total):
            if outcome in wanted:
                yield raw + b"\n"

    def get_file(request: Request) -> Response:
        tenant, file_id = tenant_of(request), request.path_params["file_id"]
        if file_id.startswith((OUTPUT_PREFIX, ERROR_PREFIX)):
            batch, wanted = output_file(tenant, file_id)
            size = sum(len(line) for line in output_lines(batch, wanted))
            created = batch.completed_at or batch.cancelled_at or batch.created_at
            return JSONResponse(file_object(file_id, size, created, f"{file_id}.jsonl", "batch_output"))
        stored = files.get(file_id, tenant)
        if stored is None:
            raise not_found("file", file_id)
        return JSONResponse(stored.openai_object())

    def file_content(request: Request) -> Response:
        tenant, file_id = tenant_of(request), request.path_params["file_id"]
        if file_id.startswith((OUTPUT_PREFIX, ERROR_PREFIX)):
            batch, wanted = output_file(tenant, file_id)
            return StreamingResponse(output_lines(batch, wanted), media_type="application/jsonl")
        stored = files.get(file_id, tenant)
        if stored is None:
            raise not_found("file", file_id)
        return StreamingResponse(_chunks(files.path(file_id)), media_type="application/jsonl")

    def delete_file(request: Request) -> Response:
        tenant, file_id = tenant_of(request), request.path_params["file_id"]
        stored = files.get(file_id, tenant)
        if stored is None:
            raise not_found("file", file_id)
        files.delete(stored)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    def mismatched_lines(stored: StoredFile, endpoint: str) -> list[str]:
        """OpenAI refuses a batch whose lines ask for another endpoint than the batch's: say which."""
        if set(stored.urls) <= {endpoint}:
            return []
        return [
            f"line {line.line}: url {line.kind.url} differs from the batch's endpoint {endpoint}"
            for line in read_lines(files.path(stored.id))
            if isinstance(line, BatchLine) and line.kind.url != endpoint
        ]

    def submit(
        stored: StoredFile,
        origin: BatchOrigin,
        metadata: dict[str, str],
        request: Request,
        via: Via,
        fallback: Fallback,
    ) -> Batch:
        wrong = mismatched_lines(stored, origin.endpoint)
        if wrong:
            shown = "\n".join(wrong[:20]) + (f"\n... and {len(wrong) - 20} more" if len(wrong) > 20 else "")
            raise ApiError(400, f"{len(wrong)} line(s) of {stored.id} do not match the endpoint:\n{shown}",
                           code="url_mismatch", param="endpoint")  # fmt: skip
        try:
            submitted = batches.submit(
                files.path(stored.id),
                name=stored.filename,
                metadata=metadata,
                origin=origin,
                parent=propagate.extract(request.headers),
                via=via,
                fallback=fallback,
            )
        except BatchError as exc:
            if isinstance(exc.__cause__, redis.RedisError):
                raise unavailable() from None
            raise ApiError(400, str(exc)) from None
        batch = submitted.batch
        batch_index.add(origin.owner, batch.id, batch.created_at)
        return batch

    async def create_batch(request: Request) -> Response:
        tenant = tenant_of(request)
        body = await json_body(request, int(settings.max_request_kb * 1000))
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        endpoint, window = body.get("endpoint"), body.get("completion_window", "24h")
        if not isinstance(endpoint, str) or endpoint not in URLS:
            raise ApiError(400, f"endpoint must be one of {', '.join(URLS)}", param="endpoint")
        if not isinstance(window, str) or window not in COMPLETION_WINDOWS:
            raise ApiError(400, "completion_window must be '24h'", param="completion_window")
        metadata = body.get("metadata") or {}
        if (
            not isinstance(metadata, dict)
            or len(metadata) > MAX_METADATA_PAIRS
            or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items()
            )
        ):
            raise ApiError(
                400, "metadata: up to 16 string pairs (keys <= 64, values <= 512 chars)", param="metadata"
            )
        via = metadata.get(VIA_METADATA_KEY, Via.LIVE.value)
        if via not in {v.value for v in Via}:
            raise ApiError(400, f"metadata.{VIA_METADATA_KEY} must be 'live' or 'batch'", param="metadata")
        fallback = metadata.get(FALLBACK_METADATA_KEY, Fallback.NONE.value)
        if fallback not in {f.value for f in Fallback}:
            raise ApiError(
                400, f"metadata.{FALLBACK_METADATA_KEY} must be 'none' or 'live'", param="metadata"
            )
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str) or not FILE_ID.fullmatch(file_id):
            raise not_found("file", shown(file_id))
        stored = await run_in_threadpool(files.get, file_id, tenant)
        if stored is None:
            raise not_found("file", file_id)
        origin = BatchOrigin(owner=tenant, input_file_id=file_id, endpoint=endpoint, completion_window=window)
        batch = await run_in_threadpool(
            submit, stored, origin, metadata, request, Via(via), Fallback(fallback)
        )
        return JSONResponse(batch_object(batch))

    def get_batch(request: Request) -> Response:
        return JSONResponse(batch_object(own_batch(tenant_of(request), request.path_params["batch_id"])))

    def cancel_batch(request: Request) -> Response:
        tenant, batch_id = tenant_of(request), request.path_params["batch_id"]
        own_batch(tenant, batch_id)
        return JSONResponse(batch_object(batches.cancel(batch_id)))

    def list_batches(request: Request) -> Response:
        tenant = tenant_of(request)
        after, limit_ = _paging(request)
        ids, more = batch_index.page(tenant, after, limit_)
        found = [b for b in (batches.store.get(i) for i in ids) if b is not None]
        return _list([batch_object(b) for b in found], more)

    def healthz(request: Request) -> Response:
        try:
            client.ping()
        except redis.RedisError:  # where Redis lives is not for a public body
            return JSONResponse({"status": "unavailable", "redis": "unreachable"}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
        return JSONResponse({"status": "ok"})

    scrapers = Tokens([settings.metrics_token.get_secret_value()]) if settings.metrics_token else None

    def metrics(request: Request) -> Response:
        if scrapers is not None and scrapers.tenant(request.headers.get("authorization")) is None:
            raise ApiError(401, "/metrics wants the ROUTERQ_METRICS_TOKEN bearer", code="invalid_api_key")
        return PlainTextResponse(metrics_text(client, settings.queue), media_type="text/plain; version=0.0.4")

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> Response:
        """Starlette's own refusals (no such route, wrong method) in OpenAI's shape."""
        assert isinstance(exc, HTTPException)
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return ApiError(exc.status_code, shown(message)[1:-1], code=code).response()

    async def redis_down(request: Request, exc: Exception) -> Response:
        log.warning("routerq serve: Redis is unavailable (%s): answering 503", type(exc).__name__)
        return unavailable().response()

    async def crashed(request: Request, exc: Exception) -> Response:
        """Anything unexpected: an OpenAI-shaped 500 (clients retry it), and the traceback logged."""
        log.error("routerq serve: %s %s failed", request.method, request.url.path, exc_info=exc)
        return ApiError(500, "the server failed to answer this request", code="server_error").response()

    routes = [
        Route("/v1/files", upload_file, methods=["POST"]),
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", get_file, methods=["GET"]),
        Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
        Route("/v1/batches", create_batch, methods=["POST"]),
        Route("/v1/batches", list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {
        ApiError: api_error,
        HTTPException: http_error,
        redis.RedisError: redis_down,
        Exception: crashed,
    }

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep_files(files))
        yield
        sweeper.cancel()

    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


async def _sweep_files(files: FileStore) -> None:
    """Uploads whose record expired, or that a dead server left, are removed as the server runs."""
    while True:
        try:
            removed = await run_in_threadpool(files.sweep)
            if removed:
                log.info("routerq serve: removed %d uploaded file(s) whose record had expired", removed)
        except Exception as exc:  # Redis away, a disk error: try again next time
            log.warning("routerq serve: sweeping uploaded files failed: %s", exc)
        await asyncio.sleep(FILE_SWEEP_S)


async def _drain(receive: Receive, up_to: int) -> None:
    """Read (and drop) the rest of a refused upload, so the client, still sending, gets the 413 rather
    than a reset connection; past `up_to` more bytes, stop reading and let the connection close."""
    seen = 0
    while seen <= up_to:
        message = await receive()
        seen += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return


async def json_body(request: Request, limit: int) -> Any:
    """A JSON request body, read up to `limit` bytes (413 past it) and parsed as routerq parses user
    JSON (400 with the reason: bad JSON or UTF-8, too deep, a lone surrogate)."""
    counting = _CountingReceive(request.receive, limit)
    try:
        raw = await Request(request.scope, counting).body()
    except _TooLarge:
        if not counting.complete:
            await _drain(request.receive, limit)
        raise ApiError(413, f"the body is larger than {limit} bytes (ROUTERQ_MAX_REQUEST_KB)",
                       code="request_too_large") from None  # fmt: skip
    try:
        return parse_json(raw)
    except ValueError as exc:
        raise ApiError(400, f"the body is {exc}") from None


def unavailable() -> ApiError:
    return ApiError(503, "routerq's Redis is unavailable; retry shortly", code="service_unavailable",
                    headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip


def _paging(request: Request) -> tuple[str | None, int]:
    raw = request.query_params.get("limit", str(DEFAULT_PAGE))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_PAGE:
        raise ApiError(400, f"limit must be between 1 and {MAX_PAGE}", param="limit")
    return request.query_params.get("after") or None, int(raw)


def _list(data: list[dict[str, Any]], has_more: bool) -> Response:
    return JSONResponse({
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    })  # fmt: skip


def _chunks(path: Any) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        yield from iter(lambda: handle.read(1 << 16), b"")
