"""The OpenAI Batch file format: input lines read and validated as a stream, with OpenAI's error codes
and the file's line numbers, and output lines written in OpenAI's shape."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routerq.core.jobs import JobKind, JobResult

URLS = {kind.url: kind for kind in JobKind}


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


def parse_line(number: int, raw: bytes, default_model: str | None) -> BatchLine | LineError:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return LineError(number, "invalid_json_line", f"not valid JSON ({exc.msg})")
    except UnicodeDecodeError:
        return LineError(number, "invalid_json_line", "not valid UTF-8")
    if not isinstance(obj, dict):
        return LineError(number, "invalid_json_line", "a line must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(number, "missing_custom_id", "custom_id must be a non-empty string")
    if obj.get("method") != "POST":
        return LineError(number, "invalid_method", f"method must be POST, got {obj.get('method')!r}")
    url = obj.get("url")
    if url not in URLS:
        return LineError(number, "invalid_url", f"url {url!r} is not one of {', '.join(URLS)}")
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


def read_lines(path: Path, default_model: str | None = None) -> Iterator[BatchLine | LineError]:
    """Streams the file; blank lines are skipped but keep their numbers, as editors show them."""
    seen: set[bytes] = set()
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            parsed = parse_line(number, raw, default_model)
            if isinstance(parsed, BatchLine):
                key = hashlib.blake2b(parsed.custom_id.encode(), digest_size=16).digest()
                if key in seen:
                    parsed = LineError(
                        number, "duplicate_custom_id", f"custom_id {parsed.custom_id!r} repeats"
                    )
                seen.add(key)
            yield parsed


def validate(path: Path, default_model: str | None = None, keep: int = 20) -> Validation:
    """One streaming pass: counts lines, keeps the first `keep` errors, and fingerprints the file."""
    result = Validation()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    result.digest = digest.hexdigest()
    for item in read_lines(path, default_model):
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
