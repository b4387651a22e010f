"""The trace budget at bulk scale: every line that matters is in Phoenix whole, the rest are sampled
within a budget all workers share, and status and the batch summary say what Phoenix holds."""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from conftest import MODELS, Stack, extra_worker, line, routerq, wait_final, write_jsonl
from phoenix.client import Client
from phoenix_queries import Span

from routerq.core.settings import DEFAULT_TRACE_BUDGET
from routerq.producer.batch_client import BatchClient


def batch_spans(stack: Stack, batch_id: str, name: str, expect: int, timeout: float = 90) -> list[Span]:
    """The batch's spans called `name`, once Phoenix holds `expect` of them (it ingests asynchronously)."""
    phoenix = Client(base_url=stack.phoenix.url)
    deadline = time.monotonic() + timeout
    spans: list[Span] = []
    while time.monotonic() < deadline:
        spans = list(
            phoenix.spans.get_spans(
                project_identifier=stack.project,
                name=name,
                attributes={"routerq.batch.id": batch_id},
                limit=10_000,
                timeout=60,
            )
        )
        if len(spans) >= expect:
            return spans
        time.sleep(1)
    raise AssertionError(f"Phoenix holds {len(spans)} {name} span(s) of batch {batch_id}, wanted {expect}")


def traces_of(stack: Stack, trace_ids: list[str]) -> dict[str, list[Span]]:
    phoenix = Client(base_url=stack.phoenix.url)
    spans = phoenix.spans.get_spans(
        project_identifier=stack.project, trace_ids=trace_ids, limit=10_000, timeout=60
    )
    out: dict[str, list[Span]] = {}
    for span in spans:
        out.setdefault(span["context"]["trace_id"], []).append(span)
    return out


def test_at_the_default_budget_every_failed_retried_and_slow_line_is_traced_whole_and_status_matches_phoenix(
    stack: Stack, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex[:8]
    failing = {i for i in range(800) if i % 100 == 7}
    retried = {i for i in range(800) if i % 100 == 13}
    slow = {650, 700, 750}  # each worker process has seen 100+ lines of the batch by then: its p99 is known

    def prompt(i: int) -> str:
        directive = (
            " [[status:400]]"
            if i in failing
            else " [[flaky:1:502]]"
            if i in retried
            else " [[slow:1.5]]"
            if i in slow
            else ""
        )
        return f"{marker} {i}{directive}"

    rows = [line(f"r{i}", "chat", prompt(i)) for i in range(800)]
    queue = f"budget-{marker}"
    env = {"ROUTERQ_TRACE_BUDGET": str(DEFAULT_TRACE_BUDGET)}
    with extra_worker(stack, queue, concurrency=64, processes=2, **env) as (_, settings):
        client = BatchClient(settings)
        batch = client.submit(write_jsonl(tmp_path / "bulk.jsonl", rows), name="bulk").batch
        final = wait_final(client, batch.id)
        status = routerq(stack, "status", batch.id, env={"ROUTERQ_QUEUE": queue})
    assert (final.succeeded, final.failed) == (792, 8)
    assert final.traced + final.sampled_out == 800
    # 1,600 spans of successes in a few seconds is far over the default budget: most are sampled out
    assert final.sampled_out > 400, final
    assert f"traces     {final.traced} of 800 lines in Phoenix" in status.stdout, status.stdout
    assert f"{final.sampled_out} successes sampled out" in status.stdout
    assert "WARNING" not in status.stdout

    roots = batch_spans(stack, batch.id, "routerq.line", expect=final.traced)
    assert len(roots) == final.traced  # exactly what status says: no more, no fewer
    by_line = {int(s["attributes"]["routerq.batch.line"]): s for s in roots}
    missing = (failing | retried | slow) - set(by_line)
    assert not missing, f"lines that must be traced are not in Phoenix: {sorted(missing)}"
    for i in failing:
        assert by_line[i]["status_code"] == "ERROR", by_line[i]
    assert all(s["status_code"] == "OK" for i, s in by_line.items() if i not in failing)

    # the whole trace of every line that matters: its root and each attempt's call under it
    wanted = sorted(failing | retried | slow)
    traces = traces_of(stack, [by_line[i]["context"]["trace_id"] for i in wanted])
    for i in wanted:
        spans = traces[by_line[i]["context"]["trace_id"]]
        calls = [s for s in spans if s["parent_id"] == by_line[i]["context"]["span_id"]]
        statuses = sorted(s["status_code"] for s in calls)
        expected = ["ERROR"] if i in failing else ["ERROR", "OK"] if i in retried else ["OK"]
        assert statuses == expected, (i, [(s["name"], s["status_code"]) for s in spans])
        if i in retried:
            assert by_line[i]["attributes"]["routerq.attempt"] == 2
        for call in calls:  # OpenInference's own LLM span, dated as the call was (see worker.call_record)
            attrs = call["attributes"]
            assert call["span_kind"] == "LLM" and MODELS["chat"] in attrs["llm.invocation_parameters"], call
            assert attrs["llm.input_messages.0.message.content"] == prompt(i), call
            if call["status_code"] == "OK":
                assert attrs["llm.model_name"] == MODELS["chat"] and attrs["llm.token_count.total"] > 0, call
            assert attrs["llm.provider"] == "openrouter" and attrs["session.id"] == batch.id, call
            assert (
                by_line[i]["start_time"] <= call["start_time"] <= call["end_time"] <= by_line[i]["end_time"]
            )
        if i in failing:
            assert calls[0]["attributes"]["http.response.status_code"] == 400
        if i in slow:
            took = datetime.fromisoformat(calls[0]["end_time"]) - datetime.fromisoformat(
                calls[0]["start_time"]
            )
            assert took.total_seconds() >= 1.4, (i, calls[0]["start_time"], calls[0]["end_time"])

    summary = batch_spans(stack, batch.id, "routerq.batch", expect=1)[0]
    attributes: dict[str, Any] = summary["attributes"]
    assert summary["parent_id"] is None and summary["status_code"] == "ERROR"
    assert attributes["session.id"] == batch.id
    assert (attributes["routerq.batch.succeeded"], attributes["routerq.batch.failed"]) == (792, 8)
    assert attributes["routerq.batch.lines_traced"] == final.traced
    assert attributes["routerq.batch.lines_sampled_out"] == final.sampled_out
    assert attributes["routerq.batch.retries"] == len(retried)
    assert attributes["routerq.batch.latency_ms.p99"] >= attributes["routerq.batch.latency_ms.p50"] > 0


def test_the_trace_budget_holds_across_two_worker_processes(stack: Stack, tmp_path: Path) -> None:
    """20 spans/s shared: two processes together keep about 20 spans/s of successes, not 20 each."""
    budget = 20
    marker = uuid.uuid4().hex[:8]
    rows = [line(f"r{i}", "chat", f"{marker} {i} [[slow:0.2]]") for i in range(800)]
    queue = f"shared-{marker}"
    with extra_worker(stack, queue, concurrency=16, processes=2, ROUTERQ_TRACE_BUDGET=str(budget)) as (
        _,
        settings,
    ):
        client = BatchClient(settings)
        batch = client.submit(write_jsonl(tmp_path / "shared.jsonl", rows)).batch
        final = wait_final(client, batch.id)
    assert final.succeeded == 800
    seconds = (final.completed_at or 0) - (final.in_progress_at or final.created_at)
    roots = batch_spans(stack, batch.id, "routerq.line", expect=final.traced)
    spans = 2 * len(roots)  # each traced line here is its root and one call
    # A second for the processes to learn their shares, plus each one's bucket: well under the 2x
    # that two processes spending the budget each would keep.
    assert spans <= budget * (seconds + 4), (spans, seconds, final)
    assert spans >= budget * (seconds - 2) * 0.5, (spans, seconds, final)  # and the budget is used


def test_a_jobs_and_a_batchs_worker_spans_go_to_the_producers_phoenix_project(
    stack: Stack, tmp_path: Path
) -> None:
    """The worker traces into its own PHOENIX_PROJECT_NAME only for work whose producer did not trace."""
    project = f"elsewhere-{uuid.uuid4().hex[:8]}"
    marker = uuid.uuid4().hex[:8]
    env = {"PHOENIX_PROJECT_NAME": project}
    job = routerq(stack, "enqueue", "--wait", f"{marker} a single job", env=env)
    source = write_jsonl(
        tmp_path / "p.jsonl", [line(f"p{i}", "chat", f"{marker} line {i}") for i in range(2)]
    )
    submitted = routerq(stack, "submit", str(source), "--wait", env=env)
    assert job.returncode == 0 and submitted.returncode == 0, job.stderr + submitted.stderr
    phoenix = Client(base_url=stack.phoenix.url)
    wanted = {"routerq.job", "run/routerq.run_job", "routerq.submit",
              "routerq.line", "routerq.batch", "ChatCompletion"}  # fmt: skip
    names: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not wanted <= names:
        try:
            names = {s["name"] for s in phoenix.spans.get_spans(project_identifier=project, limit=1000)}
        except Exception:  # 404 until the project's first span is stored
            names = set()
        time.sleep(0.5)
    assert wanted <= names, f"project {project} has {names}"
    ours = phoenix.spans.get_spans(
        project_identifier=stack.project, name="routerq.line", limit=10_000, timeout=60
    )
    assert not [s for s in ours if marker in str(s["attributes"].get("input.value"))]
