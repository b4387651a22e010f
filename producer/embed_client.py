"""Embedding backfills: texts from JSONL or CSV, many per request, vectors back in input order.

A run's id is derived from the input file, model and options, so running the same command again
after an interruption finds the stored vectors and sends only the texts that have none.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from openinference.semconv.trace import SpanAttributes

from routerq.core import telemetry
from routerq.core.batch_format import LineError
from routerq.core.batch_store import Via
from routerq.core.broker import EMBED_TASK_NAME, EMBED_UPSTREAM_BATCH_TASK_NAME
from routerq.core.embed_store import EmbedRun, EmbedStore
from routerq.core.errors import EmbedError, EmbedInputError
from routerq.core.redis_client import connect
from routerq.core.settings import Settings
from routerq.core.spans import chain_attributes
from routerq.core.staged_enqueue import StagedEnqueue
from routerq.core.upstream_batch import new_chunk_id
from routerq.core.vectors import from_float32


@dataclass
class EmbedPlan:
    run: EmbedRun
    missing: int
    requests: int
    upstream_batches: int = 0  # with via batch: the OpenRouter batches the requests go in
    errors: list[LineError] = field(default_factory=list)


def read_rows(path: Path, id_field: str, text_field: str) -> Iterator[tuple[int, str, str] | LineError]:
    """(line number, id, text) from JSONL, or from CSV with a header row; streamed."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                yield _row(reader.line_num, row, id_field, text_field)
        return
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError:
                yield LineError(number, "invalid_json_line", "not valid JSON")
                continue
            yield (
                _row(number, row, id_field, text_field)
                if isinstance(row, dict)
                else LineError(number, "invalid_json_line", "a line must be a JSON object")
            )


def _row(
    number: int, row: dict[str, Any], id_field: str, text_field: str
) -> tuple[int, str, str] | LineError:
    ident, text = row.get(id_field), row.get(text_field)
    if ident is None or ident == "":
        return LineError(number, "missing_id", f"no `{id_field}`")
    if not isinstance(text, str) or not text:
        return LineError(number, "missing_text", f"no text in `{text_field}`")
    return number, str(ident), text


class EmbedClient:
    def __init__(self, settings: Settings, *, tracing: bool = True) -> None:
        self.settings = settings
        if tracing:
            telemetry.setup_tracing(settings)
        self.redis = connect(settings.redis_url)
        self.store = EmbedStore(self.redis, settings.result_ttl)

    def run_id(self, path: Path, model: str, id_field: str, text_field: str, dimensions: int | None) -> str:
        digest = hashlib.sha256(f"{model}\0{id_field}\0{text_field}\0{dimensions}\0".encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return f"emb_{digest.hexdigest()[:24]}"

    def start(
        self,
        path: Path,
        model: str,
        *,
        id_field: str = "id",
        text_field: str = "text",
        per_request: int = 128,
        dimensions: int | None = None,
        via: Via = Via.LIVE,
    ) -> EmbedPlan:
        """Validate the whole input, store its texts once, enqueue requests for texts without vectors.
        `via` batch sends the requests as OpenRouter batches (about half the price, within 24 h)."""
        run = EmbedRun(
            id=self.run_id(path, model, id_field, text_field, dimensions),
            model=model,
            dimensions=dimensions,
            input_file=path.name,
            project=telemetry.traced_project(self.settings),
        )
        existing = self.store.get(run.id)
        if existing is None:
            run.total = self._store_inputs(run, path, id_field, text_field)
        else:
            run = existing
        run.via = via
        self.store.save(run)
        missing = list(self.store.missing(run.id, run.total))
        requests = [missing[start : start + per_request] for start in range(0, len(missing), per_request)]
        staged = StagedEnqueue(self.redis, self.settings, self.store.key(run.id))
        now = time.time()
        chunks = 0
        if via is Via.BATCH:
            sizes = [
                len(row[2].encode())
                for row in read_rows(path, id_field, text_field)
                if isinstance(row, tuple)
            ]
            for chunk in self._upstream_chunks(requests, sizes):
                staged.add(EMBED_UPSTREAM_BATCH_TASK_NAME, [run.id, new_chunk_id(), chunk, now])
                chunks += 1
        else:
            for request in requests:
                attributes = {
                    **chain_attributes(f"{len(request)} texts from {path.name}"),
                    SpanAttributes.SESSION_ID: run.id,
                    "routerq.embed.run": run.id,
                }
                staged.add(EMBED_TASK_NAME, [run.id, request, now], ("routerq.embed_request", attributes))
        staged.release()
        return EmbedPlan(run, len(missing), len(requests), chunks)

    def _upstream_chunks(self, requests: list[list[int]], sizes: list[int]) -> Iterator[list[list[int]]]:
        """Requests grouped into upstream batches under OpenRouter's request cap and routerq's byte cap."""
        chunk: list[list[int]] = []
        size = 0
        for request in requests:
            request_size = sum(sizes[index] for index in request)
            if chunk and (
                len(chunk) >= self.settings.upstream_batch_max_requests
                or size + request_size > self.settings.upstream_batch_max_bytes
            ):
                yield chunk
                chunk, size = [], 0
            chunk.append(request)
            size += request_size
        if chunk:
            yield chunk

    def _store_inputs(self, run: EmbedRun, path: Path, id_field: str, text_field: str) -> int:
        """First pass validates everything (nothing is stored if any row is bad); the second stores."""
        errors: list[LineError] = []
        count, ids = 0, set()
        for item in read_rows(path, id_field, text_field):
            if isinstance(item, tuple) and item[1] in ids:
                item = LineError(item[0], "duplicate_id", f"id {item[1]!r} repeats")
            if isinstance(item, LineError):
                count += 1
                if len(errors) < 20:
                    errors.append(item)
            else:
                ids.add(item[1])
        if count:
            raise EmbedInputError(errors, count)
        if not ids:
            raise EmbedInputError([LineError(0, "empty_file", "no rows")], 1)
        key = self.store.key(run.id, "in")
        pipe = self.redis.pipeline(transaction=False)
        total = 0
        for item in read_rows(path, id_field, text_field):
            assert isinstance(item, tuple)
            pipe.hset(key, str(total), json.dumps({"id": item[1], "text": item[2]}))
            total += 1
            if total % 2000 == 0:
                pipe.execute()
        pipe.expire(key, self.settings.result_ttl)
        pipe.execute()
        return total

    def wait(self, run_id: str, on_update: Callable[[EmbedRun], None], poll: float = 0.5) -> EmbedRun:
        while True:
            run = self.store.get(run_id)
            if run is None:
                raise EmbedError(f"embedding run {run_id} has expired")
            on_update(run)
            if run.done + run.failed >= run.total:
                return run
            time.sleep(poll)

    def write(self, run: EmbedRun, path: Path) -> int:
        """Vectors in input order: JSONL `{"id", "embedding"}` lines, or Parquet for a .parquet path."""
        if path.suffix.lower() == ".parquet":
            return self._write_parquet(run, path)
        written = 0
        with path.open("w", encoding="utf-8") as out:
            written = self._write_jsonl(run, out)
        return written

    def _write_jsonl(self, run: EmbedRun, out: IO[str]) -> int:
        written = 0
        for ident, raw in self.store.vectors(run.id, run.total):
            if raw is None:
                continue
            out.write(json.dumps({"id": ident, "embedding": from_float32(raw)}) + "\n")
            written += 1
        return written

    def _write_parquet(self, run: EmbedRun, path: Path) -> int:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise EmbedError("Parquet output needs pyarrow: pip install 'routerq[parquet]'") from exc
        schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32()))])
        written = 0
        with pq.ParquetWriter(str(path), schema) as writer:
            ids: list[str] = []
            vectors: list[list[float]] = []
            for ident, raw in self.store.vectors(run.id, run.total):
                if raw is None:
                    continue
                ids.append(ident)
                vectors.append(from_float32(raw))
                if len(ids) >= 2000:
                    writer.write_table(pa.table({"id": ids, "embedding": vectors}, schema=schema))
                    written += len(ids)
                    ids, vectors = [], []
            if ids:
                writer.write_table(pa.table({"id": ids, "embedding": vectors}, schema=schema))
                written += len(ids)
        return written
