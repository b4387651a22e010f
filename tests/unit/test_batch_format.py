"""OpenAI Batch files: every bad line named by its number and OpenAI's code; output lines in OpenAI's shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routerq.core.batch_format import BatchLine, LineError, output_line, parse_line, read_lines, validate
from routerq.core.jobs import JobError, JobKind, JobResult, Usage

CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def raw(**fields: Any) -> bytes:
    line = {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": CHAT_BODY}
    return json.dumps({**line, **fields}).encode()


def test_a_good_line_becomes_a_batch_line_of_its_kind() -> None:
    for url, kind in [("/v1/chat/completions", JobKind.CHAT), ("/v1/completions", JobKind.COMPLETION)]:
        body = CHAT_BODY if kind is JobKind.CHAT else {"model": "m", "prompt": "p"}
        assert parse_line(3, raw(url=url, body=body), None) == BatchLine(3, "c1", kind, body)
    embedding = parse_line(1, raw(url="/v1/embeddings", body={"model": "e", "input": ["a"]}), None)
    assert isinstance(embedding, BatchLine) and embedding.kind is JobKind.EMBEDDING


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", "invalid_json_line"),
        (b"\xff\xfe", "invalid_json_line"),
        (b"[1, 2]", "invalid_json_line"),
        (raw(custom_id=""), "missing_custom_id"),
        (raw(custom_id=7), "missing_custom_id"),
        (raw(method="GET"), "invalid_method"),
        (raw(url="/v1/responses"), "invalid_url"),
        (raw(body="text"), "invalid_body"),
        (raw(body={"messages": []}), "missing_model"),
        (raw(body={"model": "m"}), "invalid_body"),
        (raw(body={**CHAT_BODY, "stream": True}), "invalid_body"),
    ],
)
def test_each_kind_of_bad_line_gets_openais_code_and_its_line_number(line: bytes, code: str) -> None:
    parsed = parse_line(17, line, None)
    assert isinstance(parsed, LineError) and (parsed.line, parsed.code) == (17, code)
    assert parsed.render("in.jsonl").startswith(f"in.jsonl:17: {code}: ")


def test_a_default_model_fills_only_lines_without_one() -> None:
    no_model = parse_line(1, raw(body={"messages": []}), "fallback/model")
    has_model = parse_line(2, raw(), "fallback/model")
    assert isinstance(no_model, BatchLine) and no_model.body["model"] == "fallback/model"
    assert isinstance(has_model, BatchLine) and has_model.body["model"] == "m"


def test_blank_lines_are_skipped_but_keep_their_numbers_and_repeated_ids_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(raw() + b"\n\n" + raw(custom_id="c2") + b"\n" + raw() + b"\n")
    items = list(read_lines(path))
    assert [getattr(i, "line", None) for i in items] == [1, 3, 4]
    assert isinstance(items[2], LineError) and items[2].code == "duplicate_custom_id"


def test_validation_keeps_the_first_20_errors_and_counts_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b"".join(raw(custom_id=f"c{i}", method="GET") + b"\n" for i in range(25)) + raw() + b"\n"
    )
    validation = validate(path)
    assert (validation.lines, validation.error_count, len(validation.errors)) == (1, 25, 20)
    assert [e.line for e in validation.errors] == list(range(1, 21))
    assert not validation.ok


def test_an_empty_file_is_an_error_and_the_digest_fingerprints_the_content(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    assert validate(empty).errors[0].code == "empty_file"
    one, two = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    one.write_bytes(raw() + b"\n")
    two.write_bytes(raw(custom_id="other") + b"\n")
    assert validate(one).ok and validate(one).digest != validate(two).digest


def result(**fields: Any) -> JobResult:
    base = {"job_id": "j", "kind": JobKind.CHAT, "enqueued_at": 1.0, "started_at": 2.0, "finished_at": 3.0}
    return JobResult.model_validate({**base, **fields})


def test_a_success_is_written_as_openais_response_line() -> None:
    body = {"id": "gen-1", "choices": [{"message": {"content": "hi"}}]}
    line = output_line("c1", result(status="succeeded", response=body, generation_id="gen-1", usage=Usage()))
    assert line["id"].startswith("batch_req_") and line["custom_id"] == "c1" and line["error"] is None
    assert line["response"] == {"status_code": 200, "request_id": "gen-1", "body": body}


def test_a_failure_is_written_as_openais_error_line() -> None:
    failed = result(status="failed", error=JobError(code="rate_limit_exceeded", message="slow down"))
    line = output_line("c9", failed)
    assert line["response"] is None
    assert line["error"] == {"code": "rate_limit_exceeded", "message": "slow down"}


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(raw=st.one_of(st.binary(max_size=300), json_like.map(lambda v: json.dumps(v).encode())))
def test_any_line_is_a_request_or_a_line_error_never_an_exception(raw: bytes) -> None:
    assert isinstance(parse_line(7, raw, None), BatchLine | LineError)


@settings(max_examples=100, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(["custom_id", "method", "url", "body"]), json_like))
def test_any_object_with_the_line_fields_is_a_request_or_a_line_error(fields: dict[str, object]) -> None:
    parsed = parse_line(3, json.dumps(fields).encode(), "m")
    assert isinstance(parsed, BatchLine | LineError)
    if isinstance(parsed, LineError):
        assert parsed.line == 3 and len(parsed.message) < 400


def test_a_line_past_the_cap_is_named_and_skipped_without_losing_the_next(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    path.write_bytes(raw(custom_id="a") + b"\n" + b"x" * 5000 + b"\n" + raw(custom_id="b") + b"\n")
    parsed = list(read_lines(path, max_line=1000))
    assert isinstance(parsed[1], LineError) and (parsed[1].line, parsed[1].code) == (2, "line_too_large")
    assert [p.custom_id for p in parsed if isinstance(p, BatchLine)] == ["a", "b"]
