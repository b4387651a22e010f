"""The OpenAI Batch file format: input lines read and validated as a stream, with OpenAI's error codes
and the file's line numbers, and output lines written in OpenAI's shape."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from routerq.core.jobs import JobKind, JobResult

URLS = {kind.url: kind for kind in JobKind}
# A custom_id names a line: it is stored with the line and repeated in its output line, so it is
# bounded (OpenAI documents no limit; a 300 KB id is data, not a name).
MAX_CUSTOM_ID = 512
# One line may hold a long conversation, but not the whole upload: a line is read (and parsed) whole,
# so this bounds the memory one line costs (routerq.core.settings' ROUTERQ_MAX_LINE_MB).
DEFAULT_MAX_LINE_BYTES = 10_000_000
SHOWN = 80  # characters of a user's value quoted back in an error message


def shown(value: Any) -> str:
    """A user's value as an error message quotes it: repr'd, and cut."""
    text = repr(value)
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"


@dataclass(frozen=True)
class LineError:
    line: int
    code: str
    message: str

    def render(self, path: str) -> str:
        return f"{path}:{self.line}: {self.code}: {self.message}"


@dataclass(frozen=True)
class BatchLine:
    line: int
    custom_id: str
    kind: JobKind
    body: dict[str, Any]

    def stored(self) -> str:
        """The compact form kept in Redis for workers (and for `retry`)."""
        return json.dumps(
            {"custom_id": self.custom_id, "kind": self.kind.value, "body": self.body}, separators=(",", ":")
        )


@dataclass
class Validation:
    lines: int = 0
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0
    digest: str = ""
    urls: set[str] = field(default_factory=set)  # the endpoints the good lines ask for

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and self.lines > 0

    def report(self, name: str) -> list[str]:
        """The kept errors as `name:line: code: message`, then how many more there were."""
        lines = [error.render(name) for error in self.errors]
        hidden = self.error_count - len(self.errors)
        return [*lines, f"... and {hidden} more bad line(s)"] if hidden > 0 else lines


def parse_json(raw: bytes | str) -> Any:
    """JSON as routerq takes it from users: ValueError (with a reason fit for them) for bad JSON,
    bad UTF-8, nesting too deep for Python's parser, or a lone UTF-16 surrogate (`"\\ud800"`: valid
    JSON, but not text: it cannot be stored, logged or sent on)."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    escaped = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    if b"\\ud" in escaped.lower():
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError("holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text") from None
    return value


def parse_line(number: int, raw: bytes, default_model: str | None) -> BatchLine | LineError:
    try:
        obj = parse_json(raw)
    except ValueError as exc:
        return LineError(number, "invalid_json_line", str(exc))
    if not isinstance(obj, dict):
        return LineError(number, "invalid_json_line", "a line must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(number, "missing_custom_id", "custom_id must be a non-empty string")
    if len(custom_id) > MAX_CUSTOM_ID:
        return LineError(number, "invalid_custom_id", f"custom_id is longer than {MAX_CUSTOM_ID} characters")
    if obj.get("method") != "POST":
        return LineError(number, "invalid_method", f"method must be POST, got {shown(obj.get('method'))}")
    url = obj.get("url")
    if not isinstance(url, str) or url not in URLS:
        return LineError(number, "invalid_url", f"url {shown(url)} is not one of {', '.join(URLS)}")
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineError(number, "invalid_body", "body must be a JSON object")
    kind = URLS[url]
    if default_model and not body.get("model") and not body.get("models"):
        body = {**body, "model": default_model}
    if not body.get("model") and not body.get("models"):
        return LineError(number, "missing_model", "body.model is missing (or pass --model)")
    if kind.input_field not in body:
        return LineError(number, "invalid_body", f"body for {url} needs `{kind.input_field}`")
    if body.get("stream"):
        return LineError(number, "invalid_body", "stream is not supported in batches")
    return BatchLine(number, custom_id, kind, body)


def read_lines(
    path: Path, default_model: str | None = None, max_line: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[BatchLine | LineError]:
    """Streams the file; blank lines are skipped but keep their numbers, as editors show them. A line
    longer than `max_line` bytes is an error, and is never read whole."""
    seen: set[bytes] = set()
    with path.open("rb") as handle:
        for number, raw in _bounded_lines(handle, max_line):
            if raw is None:
                yield LineError(number, "line_too_large", f"the line is longer than {max_line} bytes")
                continue
            if not raw.strip():
                continue
            parsed = parse_line(number, raw, default_model)
            if isinstance(parsed, BatchLine):
                key = hashlib.blake2b(parsed.custom_id.encode(), digest_size=16).digest()
                if key in seen:
                    parsed = LineError(
                        number, "duplicate_custom_id", f"custom_id {shown(parsed.custom_id)} repeats"
                    )
                seen.add(key)
            yield parsed


def _bounded_lines(handle: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line), with None for a line longer than `limit` bytes (skipped in 1 MB reads)."""
    number = 0
    while raw := handle.readline(limit + 1):
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = handle.readline(1 << 20)
            yield number, None
        else:
            yield number, raw


def validate(
    path: Path, default_model: str | None = None, keep: int = 20, max_line: int = DEFAULT_MAX_LINE_BYTES
) -> Validation:
    """One streaming pass: counts lines, keeps the first `keep` errors, and fingerprints the file."""
    result = Validation()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    result.digest = digest.hexdigest()
    for item in read_lines(path, default_model, max_line):
        if isinstance(item, LineError):
            result.error_count += 1
            if len(result.errors) < keep:
                result.errors.append(item)
        else:
            result.lines += 1
            result.urls.add(item.kind.url)
    if result.lines == 0 and result.error_count == 0:
        result.errors.append(LineError(0, "empty_file", "the file has no request lines"))
        result.error_count = 1
    return result


def output_line(custom_id: str, result: JobResult) -> dict[str, Any]:
    """One line of OpenAI's batch output format."""
    if result.ok:
        response = {"status_code": 200, "request_id": result.generation_id or "", "body": result.response}
        return {"id": _line_id(), "custom_id": custom_id, "response": response, "error": None}
    error = result.error
    return error_line(custom_id, *((error.code, error.message) if error else ("server_error", "failed")))


def error_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    """A line that failed, or never ran (a cancelled batch's): one shape for every error line."""
    return {
        "id": _line_id(),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def _line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex[:24]}"
