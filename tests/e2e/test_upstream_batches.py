"""`routerq submit --via batch`: the lines go as OpenRouter batches (the fake's Batch API), at half the
live price, and everything downstream is as for a live batch: results in input order, the error
file, counts and cost, traces in Phoenix. Workers at the default retry settings."""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    DEFAULT_RETRIES,
    MODELS,
    Stack,
    calls_with,
    extra_worker,
    line,
    routerq,
    wait_final,
    wait_for,
    write_jsonl,
)
from phoenix.client import Client
from phoenix_queries import trace_spans

from routerq.core import telemetry
from routerq.core.batch_store import Batch, BatchStatus, Via
from routerq.core.spans import BATCH_ID, BATCH_LINE
from routerq.devstack.fake_openrouter import fake_answer
from routerq.devstack.fake_upstream import cost_of, count_tokens
from routerq.devstack.localstack import Service
from routerq.producer.batch_client import BatchClient

MISTRAL = "mistralai/mistral-7b-instruct"


def batch_calls(stack: Stack, marker: str) -> list[dict[str, Any]]:
    calls = httpx.get(f"{stack.fake_base}/_fake/calls").json()["calls"]
    return [c for c in calls if c.get("kind") == "batch" and any(marker in t for t in c["texts"])]


@pytest.fixture
def slow_batches(stack: Stack) -> Iterator[None]:
    """Upstream batches that take 6 s, long enough to kill a worker or cancel while they are pending."""
    httpx.post(f"{stack.fake_base}/_fake/config", json={"batch_s": 6}).raise_for_status()
    yield
    httpx.post(f"{stack.fake_base}/_fake/config", json={"batch_s": 1}).raise_for_status()


def test_a_two_model_file_goes_as_one_upstream_batch_per_model_at_half_the_price(
    stack: Stack, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex[:8]
    rows = [line(f"a{i}", "chat", f"{marker} a {i}") for i in range(5)]
    rows[1] = line("a1", "chat", f"{marker} a 1 [[status:400]]")  # refused for good: fails
    rows += [line(f"m{i}", "chat", f"{marker} m {i}", model=MISTRAL) for i in range(3)]
    rows.append(line("c0", "completion", f"{marker} a completion"))  # no batch endpoint: runs live
    source = write_jsonl(tmp_path / "two-models.jsonl", rows)
    done = routerq(stack, "submit", str(source), "--via", "batch", "--wait", timeout=180)
    assert done.returncode == 1, done.stderr  # 1: lines failed
    batch_id = done.stderr.split("batch ")[1].split(":")[0]
    upstream = batch_calls(stack, marker)
    assert sorted(c["model"] for c in upstream) == sorted([MODELS["chat"], MISTRAL])
    assert sorted(len(c["custom_ids"]) for c in upstream) == [3, 5]
    live = [c for c in calls_with(stack, marker) if c.get("kind") != "batch"]
    assert [c["kind"] for c in live] == ["completion"]  # no live call but the line batches cannot take

    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    assert routerq(stack, "results", batch_id, "-o", str(out), "--errors", str(errors)).returncode == 0
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [w["custom_id"] for w in written] == [r["custom_id"] for r in rows if r["custom_id"] != "a1"]
    first = written[0]["response"]["body"]
    assert first["choices"][0]["message"]["content"] == fake_answer(MODELS["chat"], f"{marker} a 0")
    usage = first["usage"]
    live_price = cost_of(MODELS["chat"], usage["prompt_tokens"], usage["completion_tokens"])
    assert usage["cost"] == pytest.approx(live_price / 2)  # the batch price
    (failed,) = [json.loads(x) for x in errors.read_text().splitlines()]
    assert failed["custom_id"] == "a1" and "fake upstream error 400" in failed["error"]["message"]

    status = routerq(stack, "status", batch_id)
    assert "via batch  2 upstream batches: 2 completed" in status.stdout, status.stdout
    batch = BatchClient(stack.settings(), tracing=False).get(batch_id)
    assert (batch.via, batch.succeeded, batch.failed) == (Via.BATCH, 8, 1)
    assert batch.cost == pytest.approx(sum(w["response"]["body"]["usage"]["cost"] for w in written))

    telemetry.flush()
    spans = _line_trace(stack, batch_id, 1)  # the failed line: every failure is traced
    root = next(s for s in spans if s["name"] == "routerq.line")
    (llm,) = [s for s in spans if s["name"] == "ChatCompletion"]
    assert root["status_code"] == llm["status_code"] == "ERROR"
    assert root["attributes"]["routerq.via"] == "batch"
    assert root["attributes"]["openrouter.batch_id"] in {c["batch_id"] for c in upstream}
    assert llm["parent_id"] == root["context"]["span_id"]


def _line_trace(stack: Stack, batch_id: str, index: int) -> list[dict[str, Any]]:
    """The spans of one line's trace, found by its root's batch id and line number."""
    client = Client(base_url=stack.phoenix.url)
    roots: list[dict[str, Any]] = []

    def found() -> bool:
        nonlocal roots
        roots = list(
            client.spans.get_spans(
                project_identifier=stack.project, name="routerq.line",
                attributes={BATCH_ID: batch_id, BATCH_LINE: index}, limit=10, timeout=30,
            )
        )  # fmt: skip
        return bool(roots)

    wait_for(found, f"the trace of line {index} of {batch_id} in Phoenix", timeout=60, poll=1)
    return trace_spans(stack.phoenix.url, stack.project, roots[0]["context"]["trace_id"], expect=2)


@contextmanager
def pending_upstream_batch(
    stack: Stack, tmp_path: Path, lines: int
) -> Iterator[tuple[BatchClient, Batch, Service, str]]:
    """A `--via batch` batch on a worker of its own, held at the point its upstream batch is pending."""
    marker = uuid.uuid4().hex[:8]
    rows = [line(f"p{i}", "chat", f"{marker} p {i}") for i in range(lines)]
    queue = f"via-batch-{marker}"
    client = BatchClient(stack.settings(ROUTERQ_QUEUE=queue), tracing=False)
    with extra_worker(stack, queue, **DEFAULT_RETRIES) as (worker, _):
        batch = client.submit(write_jsonl(tmp_path / f"{marker}.jsonl", rows), via=Via.BATCH).batch
        wait_for(lambda: len(batch_calls(stack, marker)) == 1, "the upstream batch to be submitted")
        yield client, batch, worker, marker


def test_a_worker_killed_while_its_upstream_batch_is_pending_finishes_it_after_restart_submitting_it_once(
    stack: Stack, tmp_path: Path, slow_batches: None
) -> None:
    with pending_upstream_batch(stack, tmp_path, 6) as (client, batch, worker, marker):
        worker.stop(signal.SIGKILL)  # while OpenRouter works on it
    with extra_worker(stack, client.settings.queue, **DEFAULT_RETRIES):
        final = wait_final(client, batch.id, timeout=120)
    assert (final.status, final.succeeded) == (BatchStatus.COMPLETED, 6)
    assert len(batch_calls(stack, marker)) == 1  # polled by the new worker, never submitted again
    assert calls_with(stack, marker) == []  # and no line went live


def test_an_expired_upstream_batch_runs_its_lines_again(stack: Stack, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex[:8]
    rows = [line(f"e{i}", "chat", f"{marker} e {i}") for i in range(3)]
    rows[0] = line("e0", "chat", f"{marker} e 0 [[batch-expire-first]]")
    client = BatchClient(stack.settings(), tracing=False)
    batch = client.submit(write_jsonl(tmp_path / "expire.jsonl", rows), via=Via.BATCH).batch
    final = wait_final(client, batch.id, timeout=120)
    assert (final.status, final.succeeded, final.failed) == (BatchStatus.COMPLETED, 3, 0)
    assert len(batch_calls(stack, marker)) == 2  # the expired one, then the lines again


def test_with_fallback_live_lines_the_upstream_batch_did_not_answer_go_live_at_once(
    stack: Stack, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex[:8]
    rows = [line(f"f{i}", "chat", f"{marker} f {i}") for i in range(4)]
    rows[1] = line("f1", "chat", f"{marker} f 1 [[batch-status:503]]")  # a retryable batch result
    rows[2] = line("f2", "chat", f"{marker} f 2 [[batch-status:400]]")  # a permanent one: fails
    source = write_jsonl(tmp_path / "fallback.jsonl", rows)
    done = routerq(
        stack, "submit", str(source), "--via", "batch", "--fallback", "live", "--wait", timeout=120
    )
    assert done.returncode == 1, done.stderr  # a line failed
    batch = BatchClient(stack.settings(), tracing=False).get(done.stdout.strip())
    assert (batch.succeeded, batch.failed) == (3, 1)
    assert len(batch_calls(stack, marker)) == 1  # no second upstream batch
    assert [c["prompt"] for c in calls_with(stack, marker)] == [rows[1]["body"]["messages"][0]["content"]]
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    assert routerq(stack, "results", batch.id, "-o", str(out), "--errors", str(errors)).returncode == 0
    assert [json.loads(x)["custom_id"] for x in errors.read_text().splitlines()] == ["f2"]
    answered = {
        json.loads(x)["custom_id"]: json.loads(x)["response"]["body"] for x in out.read_text().splitlines()
    }
    live_cost = cost_of(MODELS["chat"], answered["f1"]["usage"]["prompt_tokens"],
                        answered["f1"]["usage"]["completion_tokens"])  # fmt: skip
    assert answered["f1"]["usage"]["cost"] == pytest.approx(live_cost)  # the live price, said honestly
    assert answered["f0"]["usage"]["cost"] == pytest.approx(
        cost_of(MODELS["chat"], answered["f0"]["usage"]["prompt_tokens"],
                answered["f0"]["usage"]["completion_tokens"]) / 2
    )  # fmt: skip


def test_max_cost_sends_only_the_lines_whose_batch_price_estimate_fits_then_pauses_and_resume_ends_it(
    stack: Stack, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex[:8]
    prompts = [f"{marker} budget line {i:02d}" for i in range(20)]
    rows = [line(f"b{i}", "chat", p) for i, p in enumerate(prompts)]
    model = MODELS["chat"]
    line_cost = max(cost_of(model, count_tokens(p), count_tokens(fake_answer(model, p))) / 2 for p in prompts)
    budget = 5.5 * line_cost
    client = BatchClient(stack.settings(), tracing=False)
    batch = client.submit(write_jsonl(tmp_path / "budget.jsonl", rows), via=Via.BATCH, max_cost=budget).batch
    wait_for(lambda: client.get(batch.id).status is BatchStatus.PAUSED, "the budget to pause the batch", 120)
    wait_for(lambda: client.get(batch.id).parked + client.get(batch.id).succeeded == 20, "lines set aside")
    paused = client.get(batch.id)
    assert paused.failed == 0 and 5 <= paused.succeeded < 20, paused
    assert paused.cost <= budget + line_cost  # past the budget by at most about one line
    sent = [len(c["custom_ids"]) for c in batch_calls(stack, marker)]
    assert sent[0] == 1 and sum(sent) == paused.succeeded, sent  # the price is learnt from one line first

    assert routerq(stack, "resume", batch.id, "--max-cost", "1").returncode == 0
    final = wait_final(client, batch.id, timeout=120)
    assert (final.status, final.succeeded, final.failed) == (BatchStatus.COMPLETED, 20, 0)
    custom_ids = [i for c in batch_calls(stack, marker) for i in c["custom_ids"]]
    assert sorted(custom_ids, key=int) == [str(i) for i in range(20)]  # no line was sent twice
    assert calls_with(stack, marker) == []  # nor live


def test_a_result_without_its_cost_gets_its_share_of_the_upstream_batchs_cost_and_the_span_says_so(
    stack: Stack, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex[:8]
    prompts = [f"{marker} priced", f"{marker} unpriced [[batch-no-cost]]"]
    rows = [line(f"n{i}", "chat", p) for i, p in enumerate(prompts)]
    client = BatchClient(stack.settings(), tracing=False)
    batch = client.submit(write_jsonl(tmp_path / "no-cost.jsonl", rows), via=Via.BATCH).batch
    final = wait_final(client, batch.id, timeout=120)
    model = MODELS["chat"]
    halves = [cost_of(model, count_tokens(p), count_tokens(fake_answer(model, p))) / 2 for p in prompts]
    assert final.succeeded == 2 and final.cost == pytest.approx(sum(halves))
    telemetry.flush()
    (llm,) = [s for s in _line_trace(stack, batch.id, 1) if s["name"] == "ChatCompletion"]
    assert llm["attributes"]["routerq.cost_apportioned"] is True
    assert llm["attributes"]["llm.cost.total"] == pytest.approx(halves[1])


def test_cancel_while_the_upstream_batch_is_pending_ends_the_batch_without_its_answers(
    stack: Stack, tmp_path: Path, slow_batches: None
) -> None:
    with pending_upstream_batch(stack, tmp_path, 4) as (client, batch, _, _):
        client.cancel(batch.id)
        final = wait_final(client, batch.id, timeout=120)
        assert (final.status, final.cancelled, final.succeeded) == (BatchStatus.CANCELLED, 4, 0)
        # OpenRouter's batch cannot be cancelled: what it bills when it ends is cost, never answers
        wait_for(lambda: client.get(batch.id).cost_after_cancel > 0, "the upstream batch's bill", timeout=60)
    status = routerq(stack, "status", batch.id, env={"ROUTERQ_QUEUE": client.settings.queue})
    assert "billed for OpenRouter batches that ended after the cancel" in status.stdout, status.stdout
    assert client.get(batch.id).succeeded == 0


def test_the_stand_ins_batch_api_refuses_what_openrouters_refuses(stack: Stack) -> None:
    """routerq's client writes endpoint and model first; the stand-in holds it to OpenRouter's rules."""
    url = f"{stack.fake_base}/api/beta/batches"
    auth = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}
    request = {"custom_id": "0", "body": {"messages": [{"role": "user", "content": "hi"}]}}
    requests_first = json.dumps(
        {"requests": [request], "endpoint": "/v1/chat/completions", "model": MODELS["chat"]}
    )
    refused = httpx.post(url, content=requests_first, headers=auth)
    assert refused.status_code == 400 and "before requests" in refused.json()["error"]["message"]
    other_model = {**request, "body": {**request["body"], "model": MISTRAL}}
    mismatch = json.dumps(
        {"endpoint": "/v1/chat/completions", "model": MODELS["chat"], "requests": [other_model]}
    )
    assert httpx.post(url, content=mismatch, headers=auth).status_code == 400
    too_many = [{**request, "custom_id": str(i)} for i in range(5001)]
    big = json.dumps({"endpoint": "/v1/chat/completions", "model": MODELS["chat"], "requests": too_many})
    assert httpx.post(url, content=big, headers=auth).status_code == 400
    good = json.dumps({"endpoint": "/v1/chat/completions", "model": MODELS["chat"], "requests": [request]})
    accepted = httpx.post(url, content=good, headers=auth)
    assert accepted.status_code == 202 and accepted.json()["status"] == "validating"
