"""The traced pipeline: producer → Redis → worker → OpenRouter, one trace per job in Phoenix."""

from __future__ import annotations

import httpx
import pytest
from conftest import Stack
from opentelemetry import trace
from phoenix_queries import by_name, span_cost, trace_spans

from routerq.core import telemetry
from routerq.core.jobs import Job, JobKind, embedding_vector
from routerq.devstack.fake_openrouter import fake_answer, fake_embedding
from routerq.producer import Producer

CHAT = "meta-llama/llama-3.1-8b-instruct"
COMPLETION = "mistralai/mistral-7b-instruct"
EMBEDDING = "openai/text-embedding-3-small"
MAX_ATTEMPTS = 3  # ROUTERQ_MAX_ATTEMPTS in the test stack

KINDS = [
    (JobKind.CHAT, CHAT, {"messages": [{"role": "user", "content": "Write a haiku about observability."}]},
     "ChatCompletion", "LLM"),
    (JobKind.COMPLETION, COMPLETION, {"prompt": "Once upon a time"}, "Completion", "LLM"),
    (JobKind.EMBEDDING, EMBEDDING, {"input": "some text"}, "CreateEmbeddings", "EMBEDDING"),
]  # fmt: skip


@pytest.fixture(scope="module")
def producer(stack: Stack) -> Producer:
    return Producer(stack.settings())


def fake_calls(stack: Stack) -> list[dict[str, object]]:
    return list(httpx.get(f"{stack.fake_base}/_fake/calls").json()["calls"])


def chat_job(prompt: str, **fields: object) -> Job:
    return Job(
        kind=JobKind.CHAT, body={"model": CHAT, "messages": [{"role": "user", "content": prompt}]}, **fields
    )


@pytest.mark.parametrize(("kind", "model", "request_body", "llm_span", "llm_kind"), KINDS)
def test_each_kind_returns_its_answer_with_one_full_trace_in_phoenix(
    stack: Stack, producer: Producer, kind: JobKind, model: str, request_body: dict[str, object],
    llm_span: str, llm_kind: str,
) -> None:  # fmt: skip
    job = Job(
        kind=kind,
        body={"model": model, **request_body},
        session_id=f"S-{kind.value}",
        user_id="U1",
        metadata={"team": "search"},
        tags=["nightly"],
    )
    result = producer.run(job, timeout=60)
    telemetry.flush()

    assert result.ok, result.error
    if kind is JobKind.EMBEDDING:
        vector = embedding_vector(result.response["data"][0]["embedding"])  # type: ignore[index]
        assert vector == fake_embedding("some text", 1536)
    else:
        prompt = job.prompt_text
        assert result.text == fake_answer(model, prompt)
    assert result.usage is not None and result.usage.cost is not None and result.usage.cost > 0
    assert result.generation_id and result.generation_id.startswith("gen-")

    assert result.trace_id
    spans = trace_spans(stack.phoenix.url, stack.project, result.trace_id, expect=3)
    root = by_name(spans, "routerq.job")
    run = by_name(spans, "run/routerq.run_job")
    llm = by_name(spans, llm_span)
    assert len(spans) == 3
    assert root.get("parent_id") is None
    assert run["parent_id"] == root["context"]["span_id"]  # the context travelled in the message
    assert llm["parent_id"] == run["context"]["span_id"]

    assert root["span_kind"] == run["span_kind"] == "CHAIN"  # never "unknown" in Phoenix
    assert root["status_code"] == run["status_code"] == llm["status_code"] == "OK"  # success is OK everywhere
    assert root["attributes"]["input.value"] == job.prompt_text
    assert root["attributes"]["output.value"] == result.text
    assert llm["span_kind"] == llm_kind

    attrs = llm["attributes"]
    model_key = "embedding.model_name" if kind is JobKind.EMBEDDING else "llm.model_name"
    assert attrs[model_key] == model
    assert attrs["llm.provider"] == "openrouter"
    assert attrs["llm.token_count.prompt"] == result.usage.prompt_tokens
    assert attrs["llm.token_count.total"] == result.usage.total_tokens
    assert attrs["llm.cost.total"] == pytest.approx(result.usage.cost, rel=1e-12)
    assert attrs["openrouter.generation_id"] == result.generation_id
    assert attrs["openrouter.provider"] == result.provider
    assert result.provider in {"DeepInfra", "Together", "Lambda", "Novita"}

    run_attrs = run["attributes"]
    assert run_attrs["routerq.job.id"] == job.id
    assert 0 <= run_attrs["routerq.queue_wait_ms"] < 60_000
    for span in (run, llm):
        assert span["attributes"]["session.id"] == job.session_id
        assert span["attributes"]["user.id"] == "U1"
        assert span["attributes"]["metadata.team"] == "search"
        assert span["attributes"]["tag.tags"] == ["nightly"]

    if llm_kind == "LLM":  # Phoenix prices LLM spans only
        assert span_cost(stack.phoenix.url, llm) == pytest.approx(result.usage.cost, rel=1e-9)


def test_job_joins_the_callers_trace_when_there_is_a_current_span(stack: Stack, producer: Producer) -> None:
    with telemetry.tracer().start_as_current_span("caller") as caller:
        result = producer.run(chat_job("inside a caller span"), timeout=60)
    telemetry.flush()
    caller_context = caller.get_span_context()
    assert result.trace_id == f"{caller_context.trace_id:032x}"
    spans = trace_spans(stack.phoenix.url, stack.project, result.trace_id, expect=4)
    assert by_name(spans, "routerq.job")["parent_id"] == f"{caller_context.span_id:016x}"
    assert trace.get_current_span() is not caller


def test_upstream_400_fails_the_job_with_openrouters_message_and_error_spans(
    stack: Stack, producer: Producer
) -> None:
    result = producer.run(chat_job("please fail [[status:400]]"), timeout=60)
    telemetry.flush()
    assert not result.ok
    assert result.error is not None
    assert result.error.status_code == 400
    assert result.error.message == "fake upstream error 400"
    assert result.response is None
    spans = trace_spans(stack.phoenix.url, stack.project, result.trace_id or "", expect=3)
    llm, run, root = by_name(spans, "ChatCompletion"), by_name(spans, "run/"), by_name(spans, "routerq.job")
    for span in (llm, run, root):
        assert span["status_code"] == "ERROR"
        assert "fake upstream error 400" in span.get("status_message", "")
    assert llm["attributes"]["http.response.status_code"] == 400
    assert llm["attributes"]["llm.provider"] == "openrouter"


@pytest.mark.parametrize(
    ("directive", "message", "attempts"),
    [
        ("[[200-error]]", "Upstream provider crashed mid-generation", MAX_ATTEMPTS),  # retried, then failed
        ("[[empty]]", "answer has no choices", 1),  # unusable: fails at once
    ],
)
def test_a_200_answer_without_a_usable_result_is_a_failure_not_a_success(
    stack: Stack, producer: Producer, directive: str, message: str, attempts: int
) -> None:
    result = producer.run(chat_job(f"looks fine {directive}"), timeout=60)
    telemetry.flush()
    stored = producer.store.get(result.job_id)
    assert stored is not None and stored.status == "failed"
    assert stored.error is not None and message in stored.error.message
    assert stored.attempts == attempts
    # the root, a run and a call per attempt, and the worker's publish of each retry
    spans = trace_spans(stack.phoenix.url, stack.project, result.trace_id or "", expect=3 * attempts)
    llms = [s for s in spans if s["name"] == "ChatCompletion"]
    runs = [s for s in spans if s["name"].startswith("run/")]
    assert len(llms) == len(runs) == attempts
    assert all(s["status_code"] == "ERROR" for s in llms + runs)
    assert sorted(r["attributes"]["routerq.attempt"] for r in runs) == list(range(1, attempts + 1))


def test_handle_get_waits_for_the_result_and_raises_on_failure(producer: Producer) -> None:
    handle = producer.enqueue({"model": CHAT, "messages": [{"role": "user", "content": "hello"}]})
    assert handle.get(timeout=60).text == fake_answer(CHAT, "hello")
    failing = producer.enqueue({"model": CHAT, "messages": [{"role": "user", "content": "[[status:404]]"}]})
    with pytest.raises(RuntimeError, match="HTTP 404"):
        failing.get(timeout=60)


def test_requests_carry_attribution_headers_and_unchanged_openrouter_fields(
    stack: Stack, producer: Producer
) -> None:
    body = {
        "model": CHAT,
        "models": [CHAT, COMPLETION],
        "provider": {"order": ["DeepInfra"], "allow_fallbacks": True},
        "messages": [{"role": "user", "content": "attribution check"}],
        "response_format": {"type": "json_object"},
    }
    assert producer.enqueue(body).get(timeout=60).ok
    call = next(c for c in fake_calls(stack) if c.get("prompt") == "attribution check")
    assert call["title"] == "routerq"
    assert call["referer"] == "https://example.test/routerq"
    assert call["body"] == body  # what reached OpenRouter is exactly what the producer enqueued


def test_a_30_mib_prompt_is_traced_with_its_head_and_does_not_stall_the_workers_later_spans(
    stack: Stack, producer: Producer
) -> None:
    """Its spans were one 188 MB export request, refused (OTLP's 64 MiB) and re-sent for minutes with
    the worker's later spans queued behind it. Now each long attribute keeps its head and says how
    much was cut, and the next job's trace follows at once."""
    prompt = "tell me about this " + "x" * (30 * 1024 * 1024)
    big = producer.run(
        Job(kind=JobKind.CHAT, body={"model": CHAT, "messages": [{"role": "user", "content": prompt}]}),
        timeout=120,
    )
    small = producer.run(
        Job(
            kind=JobKind.CHAT,
            body={"model": CHAT, "messages": [{"role": "user", "content": "after the big one"}]},
        ),
        timeout=60,
    )
    telemetry.flush()
    assert big.ok and small.ok and big.trace_id and small.trace_id
    trace_spans(stack.phoenix.url, stack.project, small.trace_id, expect=3, timeout=30)
    spans = trace_spans(stack.phoenix.url, stack.project, big.trace_id, expect=3, timeout=30)
    root_input = by_name(spans, "routerq.job")["attributes"]["input.value"]
    assert root_input.startswith("tell me about this xxx") and len(root_input) < 200_000
    assert root_input.endswith(f"of {len(prompt):,} characters]")
    llm = by_name(spans, "ChatCompletion")
    assert "routerq cut" in str(llm["attributes"]) and len(str(llm["attributes"])) < 1_000_000
