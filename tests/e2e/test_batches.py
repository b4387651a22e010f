"""Bulk batches in OpenAI Batch format: submit, status, results, cancel, retry, idempotency."""

from __future__ import annotations

import json
import random
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    Stack,
    calls_with,
    line,
    queue_drained_behind,
    routerq,
    wait_final,
    wait_for,
    write_jsonl,
)
from phoenix_queries import trace_spans

from routerq.core import telemetry
from routerq.core.batch_store import BatchStatus
from routerq.core.errors import BatchFileError
from routerq.core.jobs import embedding_vector
from routerq.devstack.fake_openrouter import fake_answer, fake_embedding
from routerq.producer.batch_client import BatchClient

CHAT = "meta-llama/llama-3.1-8b-instruct"
COMPLETION = "mistralai/mistral-7b-instruct"
EMBEDDING = "openai/text-embedding-3-small"

# OpenAI's documented output lines (Batch API guide), the shape routerq's output must have.
OPENAI_OUTPUT_EXAMPLES = [
    {"id": "batch_req_123", "custom_id": "request-2", "response": {"status_code": 200, "request_id": "req_123",
     "body": {"id": "chatcmpl-123", "object": "chat.completion", "created": 1711652795, "model": "gpt-3.5-turbo-0125",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."}, "logprobs": None,
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 22, "completion_tokens": 2, "total_tokens": 24},
              "system_fingerprint": "fp_123"}}, "error": None},
    {"id": "batch_req_456", "custom_id": "request-1", "response": {"status_code": 200, "request_id": "req_789",
     "body": {"id": "chatcmpl-abc", "object": "chat.completion", "created": 1711652789, "model": "gpt-3.5-turbo-0125",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I assist you today?"},
                           "logprobs": None, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29},
              "system_fingerprint": "fp_3ba"}}, "error": None},
]  # fmt: skip
OPENAI_ERROR_EXAMPLE = {"id": "batch_req_456", "custom_id": "request-2", "response": None,
                        "error": {"code": "server_error", "message": "..."}}  # fmt: skip


@pytest.fixture(scope="module")
def client(stack: Stack) -> BatchClient:
    return BatchClient(stack.settings())


def same_shape(ours: Any, theirs: Any, path: str = "") -> None:
    """Same keys and JSON types, recursively, where OpenAI's example says what is there."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), path
        missing = set(theirs) - set(ours) - {"system_fingerprint", "logprobs"}
        assert not missing, f"{path}: missing {missing}"
        for key in set(theirs) & set(ours):
            same_shape(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(theirs, list) and theirs:
        assert isinstance(ours, list) and ours, path
        same_shape(ours[0], theirs[0], f"{path}[0]")
    elif theirs is not None:
        assert type(ours) is type(theirs), f"{path}: {type(ours)} vs {type(theirs)}"


def test_a_mixed_200_line_file_round_trips_to_openai_output_in_input_order(
    stack: Stack, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex[:8]
    rng = random.Random(7)
    ids = [f"req-{rng.randrange(10**9)}-{i}" for i in range(200)]
    rng.shuffle(ids)
    kinds = ["chat", "completion", "embedding"]
    rows = [line(cid, kinds[i % 3], f"{marker} line {i} about {cid}") for i, cid in enumerate(ids)]
    source = write_jsonl(tmp_path / "mixed.jsonl", rows)

    done = routerq(stack, "submit", str(source), "--name", "mixed", "--metadata", "team=search", "--wait")
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.strip().splitlines()[-1]
    assert batch_id.startswith("batch_")
    out = tmp_path / "out.jsonl"
    done = routerq(stack, "results", batch_id, "-o", str(out))
    assert done.returncode == 0, done.stderr

    outputs = [json.loads(raw) for raw in out.read_text().splitlines()]
    assert [o["custom_id"] for o in outputs] == ids
    for row, output in zip(rows, outputs, strict=True):
        assert set(output) == set(OPENAI_OUTPUT_EXAMPLES[0])
        assert output["id"].startswith("batch_req_") and output["error"] is None
        response = output["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("gen-")
        body = response["body"]
        if row["url"] == "/v1/embeddings":
            assert embedding_vector(body["data"][0]["embedding"]) == fake_embedding(
                row["body"]["input"], 1536
            )
            continue
        assert set(response) == set(OPENAI_OUTPUT_EXAMPLES[0]["response"])
        if "messages" in row["body"]:
            for example in OPENAI_OUTPUT_EXAMPLES:
                same_shape(output, example)
        text = (
            body["choices"][0]["message"]["content"]
            if "messages" in row["body"]
            else body["choices"][0]["text"]
        )
        prompt = row["body"]["messages"][0]["content"] if "messages" in row["body"] else row["body"]["prompt"]
        assert text == fake_answer(row["body"]["model"], prompt)
    assert len(calls_with(stack, marker)) == 200

    status = json.loads(routerq(stack, "status", batch_id, "--json").stdout)
    assert status["status"] == "completed"
    assert status["request_counts"]["total"] == 200 and status["request_counts"]["completed"] == 200
    assert status["request_counts"]["failed"] == 0
    assert status["usage"]["cost"] > 0 and status["usage"]["input_tokens"] > 0
    assert status["metadata"] == {"name": "mixed", "team": "search"}
    assert status["completed_at"] >= status["created_at"]
    assert batch_id in routerq(stack, "batches").stdout.splitlines()[0]


def test_failed_lines_are_reported_like_openai_errors(
    stack: Stack, client: BatchClient, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex[:8]
    rows = [line(f"r{i}", "chat", f"{marker} {i}" + (" [[status:400]]" if i % 2 else "")) for i in range(6)]
    batch = client.submit(write_jsonl(tmp_path / "half.jsonl", rows)).batch
    final = wait_final(client, batch.id)
    assert (final.status, final.succeeded, final.failed) == (BatchStatus.COMPLETED, 3, 3)

    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    done = routerq(stack, "results", batch.id, "-o", str(out), "--errors", str(err))
    assert done.returncode == 0, done.stderr
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["r0", "r2", "r4"]
    errors = [json.loads(x) for x in err.read_text().splitlines()]
    assert [e["custom_id"] for e in errors] == ["r1", "r3", "r5"]
    for error in errors:
        assert set(error) == set(OPENAI_ERROR_EXAMPLE) and error["response"] is None
        assert error["error"] == {"code": "invalid_request_error", "message": "fake upstream error 400"}

    together = tmp_path / "all.jsonl"
    assert routerq(stack, "results", batch.id, "-o", str(together)).returncode == 0
    assert [json.loads(x)["custom_id"] for x in together.read_text().splitlines()] == [
        f"r{i}" for i in range(6)
    ]


def test_a_file_with_bad_lines_is_refused_whole_and_nothing_is_sent(
    stack: Stack, client: BatchClient, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex[:8]
    batches_before = {b.id for b in client.recent(1000)}
    good = line("ok-1", "chat", f"{marker} fine")
    rows: list[dict[str, Any] | str] = [
        good,
        "{not json",
        {**line("x", "chat", f"{marker} a"), "custom_id": None},
        line("ok-1", "chat", f"{marker} again"),
        {**line("u", "chat", f"{marker} b"), "url": "/v1/images/generations"},
        {**line("m", "chat", f"{marker} c"), "method": "GET"},
        line("ok-2", "chat", f"{marker} fine too"),
    ]
    source = tmp_path / "bad.jsonl"
    source.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    done = routerq(stack, "submit", str(source))
    assert done.returncode == 1
    assert done.stdout == ""
    errors = [x for x in done.stderr.splitlines() if x.startswith(str(source))]
    assert errors[:5] == [
        f"{source}:2: invalid_json_line: not valid JSON (Expecting property name enclosed in double quotes)",
        f"{source}:3: missing_custom_id: custom_id must be a non-empty string",
        f"{source}:4: duplicate_custom_id: custom_id 'ok-1' repeats",
        f"{source}:5: invalid_url: url '/v1/images/generations' is not one of /v1/chat/completions, "
        "/v1/completions, /v1/embeddings",
        f"{source}:6: invalid_method: method must be POST, got 'GET'",
    ]
    assert "5 bad line(s); nothing was enqueued" in done.stderr
    assert {b.id for b in client.recent(1000)} == batches_before  # no batch stored
    queue_drained_behind(stack, client, tmp_path)
    assert calls_with(stack, marker) == []


def test_validation_lists_the_first_20_errors_then_a_count(
    stack: Stack, client: BatchClient, tmp_path: Path
) -> None:
    source = write_jsonl(tmp_path / "many.jsonl", ["nope"] * 25)
    with pytest.raises(BatchFileError) as caught:
        client.submit(source)
    assert caught.value.validation.error_count == 25 and len(caught.value.validation.errors) == 20
    done = routerq(stack, "submit", str(source))
    assert "... and 5 more bad line(s)" in done.stderr


def test_model_option_fills_a_missing_model_and_missing_model_is_an_error(
    stack: Stack, client: BatchClient, tmp_path: Path
) -> None:
    row = line("a", "chat", f"{uuid.uuid4().hex[:8]} no model")
    del row["body"]["model"]
    source = write_jsonl(tmp_path / "nomodel.jsonl", [row])
    done = routerq(stack, "submit", str(source))
    assert done.returncode == 1 and f"{source}:1: missing_model" in done.stderr
    batch = client.submit(source, model=CHAT).batch
    assert wait_final(client, batch.id).succeeded == 1


def test_cancel_stops_sending_queued_lines_upstream(
    stack: Stack, client: BatchClient, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex[:8]
    rows = [line(f"c{i}", "chat", f"{marker} {i} [[slow:0.3]]") for i in range(80)]
    batch = client.submit(write_jsonl(tmp_path / "slow.jsonl", rows)).batch
    wait_for(lambda: len(calls_with(stack, marker)) >= 8, "8 lines to reach the fake upstream")
    done = routerq(stack, "cancel", batch.id)
    assert done.returncode == 0, done.stderr
    final = wait_final(client, batch.id)
    sent = len(calls_with(stack, marker))
    queue_drained_behind(stack, client, tmp_path)
    assert len(calls_with(stack, marker)) == sent
    assert final.status is BatchStatus.CANCELLED
    assert final.cancelled > 0 and sent < 80
    assert final.succeeded + final.failed + final.cancelled == 80
    assert final.succeeded == sent  # every line that went upstream was kept, none was lost


def test_one_idempotency_key_makes_one_batch(stack: Stack, client: BatchClient, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex[:8]
    source = write_jsonl(tmp_path / "idem.jsonl", [line(f"i{i}", "chat", f"{marker} {i}") for i in range(5)])
    key = f"nightly-{marker}"
    first = routerq(stack, "submit", str(source), "--idempotency-key", key, "--wait")
    assert first.returncode == 0, first.stderr
    second = routerq(stack, "submit", str(source), "--idempotency-key", key)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == first.stdout.strip()
    assert "exists already" in second.stderr
    queue_drained_behind(stack, client, tmp_path)
    assert len(calls_with(stack, marker)) == 5

    other = write_jsonl(tmp_path / "other.jsonl", [line("z", "chat", f"{marker} other")])
    third = routerq(stack, "submit", str(other), "--idempotency-key", key)
    assert third.returncode == 1 and "different file" in third.stderr


def test_retry_sends_only_the_failed_lines_again(stack: Stack, client: BatchClient, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex[:8]
    rows = [
        line(f"f{i}", "chat", f"{marker} {i}" + (" [[flaky:1:400]]" if i in (3, 7) else ""))
        for i in range(10)
    ]
    batch = client.submit(write_jsonl(tmp_path / "flaky.jsonl", rows)).batch
    first = wait_final(client, batch.id)
    assert (first.succeeded, first.failed) == (8, 2)
    assert len(calls_with(stack, marker)) == 10

    done = routerq(stack, "retry", batch.id)
    assert done.returncode == 0 and "re-enqueued 2 failed line(s)" in done.stderr
    second = wait_final(client, batch.id)
    assert (second.status, second.succeeded, second.failed) == (BatchStatus.COMPLETED, 10, 0)
    again = calls_with(stack, marker)[10:]
    assert sorted(c["prompt"] for c in again) == sorted(f"{marker} {i} [[flaky:1:400]]" for i in (3, 7))


def test_every_line_is_its_own_trace_and_the_batch_is_one_phoenix_session(
    stack: Stack, client: BatchClient, tmp_path: Path
) -> None:
    """A line's trace: `routerq.line` from its enqueue to its final outcome (the queue wait is the gap
    before the call), each attempt's LLM call under it; a line that succeeded on its second attempt
    shows OK at its root, its failed first call an ERROR child."""
    from phoenix.client import Client

    marker = uuid.uuid4().hex[:8]
    rows = [line(f"p{i}", "chat", f"{marker} {i}" + (" [[flaky:1:502]]" if i == 3 else "")) for i in range(4)]
    batch = client.submit(write_jsonl(tmp_path / "traced.jsonl", rows), name="traced").batch
    assert wait_final(client, batch.id).succeeded == 4
    telemetry.flush()

    trace_ids: set[str] = set()
    phoenix = Client(base_url=stack.phoenix.url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:  # 404 until Phoenix has ingested the project's first spans
            traces = phoenix.traces.get_traces(
                project_identifier=stack.project, session_id=batch.id, limit=100
            )
        except httpx.HTTPStatusError:
            traces = []
        trace_ids = {t["trace_id"] for t in traces}
        if len(trace_ids) >= 6:
            break
        time.sleep(0.5)
    assert len(trace_ids) == 6, trace_ids  # the submit, one per line, the batch summary
    custom_ids = set()
    for trace_id in trace_ids:
        spans = trace_spans(stack.phoenix.url, stack.project, trace_id, expect=1)
        if any(s["name"] in ("routerq.submit", "routerq.batch") for s in spans):
            continue
        retried = any("[[flaky" in str(s["attributes"].get("input.value")) for s in spans)
        spans = trace_spans(stack.phoenix.url, stack.project, trace_id, expect=3 if retried else 2)
        roots = [s for s in spans if s["parent_id"] is None]
        assert len(roots) == 1 and roots[0]["name"] == "routerq.line"
        root = roots[0]
        assert root["span_kind"] == "CHAIN" and root["status_code"] == "OK"
        assert root["attributes"]["routerq.batch.id"] == batch.id
        assert root["attributes"]["session.id"] == batch.id
        assert root["attributes"]["input.value"].startswith(f"{marker} ")
        assert root["attributes"]["routerq.queue_wait_ms"] >= 0
        calls = [s for s in spans if s["parent_id"] == root["context"]["span_id"]]
        assert [s["name"] for s in calls] == ["ChatCompletion"] * len(calls), calls
        if retried:
            assert root["attributes"]["routerq.attempt"] == 2
            assert sorted(s["status_code"] for s in calls) == ["ERROR", "OK"]
        llm = next(s for s in calls if s["status_code"] == "OK")
        assert (
            root["attributes"]["output.value"] == llm["attributes"]["llm.output_messages.0.message.content"]
        )
        assert root["start_time"] <= min(s["start_time"] for s in calls)
        assert root["end_time"] >= max(s["end_time"] for s in calls)
        assert llm["attributes"]["session.id"] == batch.id
        assert llm["attributes"]["metadata.batch_id"] == batch.id
        assert llm["attributes"]["metadata.batch_name"] == "traced"
        custom_ids.add(llm["attributes"]["metadata.custom_id"])
    assert custom_ids == {f"p{i}" for i in range(4)}
