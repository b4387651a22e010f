"""Embedding backfills: packed requests, vectors in id order, float32 storage, resumable."""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import redis
from conftest import ROUTERQ, Stack, extra_worker, routerq, wait_for
from phoenix.client import Client

from routerq.core.embed_store import EmbedStore
from routerq.devstack.fake_openrouter import fake_embedding
from routerq.devstack.fake_upstream import PRICES
from routerq.producer.embed_client import EmbedClient

MODEL = "openai/text-embedding-3-small"


def texts_file(path: Path, marker: str, n: int, slow: bool = False) -> Path:
    rows = []
    for i in range(n):
        text = f"{marker} text number {i}" + (" [[slow:0.4]]" if slow and i % 128 == 0 else "")
        rows.append(json.dumps({"doc": f"d{i:04d}", "body": text}))
    path.write_text("\n".join(rows) + "\n")
    return path


def embed_calls(stack: Stack, marker: str) -> list[dict[str, object]]:
    calls = httpx.get(f"{stack.fake_base}/_fake/calls").json()["calls"]
    return [c for c in calls if c["kind"] == "embedding" and marker in (c.get("prompt") or "")]


def test_embed_packs_1000_texts_into_8_requests_and_writes_vectors_in_id_order(
    stack: Stack, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex[:8]
    source = texts_file(tmp_path / "texts.jsonl", marker, 1000)
    out = tmp_path / "vectors.jsonl"
    done = routerq(
        stack, "embed", str(source), "--model", MODEL, "--id-field", "doc", "--text-field", "body",
        "--inputs-per-request", "128", "-o", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    calls = embed_calls(stack, marker)
    assert len(calls) == 8
    assert sorted(c["inputs"] for c in calls) == [104] + [128] * 7

    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"d{i:04d}" for i in range(1000)]
    for i in (0, 1, 127, 128, 500, 999):
        assert rows[i]["embedding"] == fake_embedding(f"{marker} text number {i}", 1536)

    parquet = tmp_path / "vectors.parquet"
    again = routerq(stack, "embed", str(source), "--model", MODEL, "--id-field", "doc", "--text-field", "body",
                    "-o", str(parquet))  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert len(embed_calls(stack, marker)) == 8  # everything was stored: nothing sent again
    table = pq.read_table(parquet)
    assert table.column("id").to_pylist() == [f"d{i:04d}" for i in range(1000)]
    assert table.column("embedding").to_pylist()[999] == rows[999]["embedding"]

    run_id = next(w for w in done.stderr.split() if w.startswith("emb_")).rstrip(":")
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    key = EmbedStore.key(run_id, "vec")
    per_vector = client.memory_usage(key, samples=0) / client.hlen(key)
    assert per_vector <= 1.3 * 1536 * 4, per_vector


def test_bad_rows_are_refused_with_line_numbers(stack: Stack, tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"id": "a", "text": "fine"}\n{"id": "b"}\nnot json\n{"id": "a", "text": "again"}\n')
    done = routerq(stack, "embed", str(source), "--model", MODEL, "-o", str(tmp_path / "v.jsonl"))
    assert done.returncode == 1
    assert f"{source}:2: missing_text" in done.stderr
    assert f"{source}:3: invalid_json_line" in done.stderr
    assert f"{source}:4: duplicate_id" in done.stderr


def test_csv_input_works_like_jsonl(stack: Stack, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex[:8]
    source = tmp_path / "texts.csv"
    source.write_text("id,text\n" + "".join(f'{i},"{marker}, number {i}"\n' for i in range(10)))
    out = tmp_path / "v.jsonl"
    done = routerq(stack, "embed", str(source), "--model", MODEL, "-o", str(out))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [str(i) for i in range(10)]
    assert rows[3]["embedding"] == fake_embedding(f"{marker}, number 3", 1536)


@pytest.mark.timeout(240)
def test_an_interrupted_embed_resends_only_the_texts_without_vectors(stack: Stack, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex[:8]
    source = texts_file(tmp_path / "resume.jsonl", marker, 1000, slow=True)
    out = tmp_path / "vectors.jsonl"
    argv = [
        ROUTERQ,
        "embed",
        str(source),
        "--model",
        MODEL,
        "--id-field",
        "doc",
        "--text-field",
        "body",
        "-o",
        str(out),
    ]
    queue = f"embed-resume-{marker}"
    env = {**stack.env, "ROUTERQ_QUEUE": queue}
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    with extra_worker(stack, queue, ROUTERQ_QUEUE=queue) as (worker, _):
        cli = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        wait_for(
            lambda: len([c for c in embed_calls(stack, marker) if "status" in c]) >= 3,
            "3 embedding requests to be answered",
        )
        worker.stop(signal.SIGKILL)
        cli.send_signal(signal.SIGKILL)
        cli.wait(10)
    client.delete(queue)  # whatever was still queued is gone: only the re-run can finish the job
    run_id = EmbedClient(stack.settings(), tracing=False).run_id(source, MODEL, "doc", "body", None)
    embedded = {int(i) for i in client.hkeys(EmbedStore.key(run_id, "vec"))}
    assert 0 < len(embedded) < 1000
    sent_before = len(embed_calls(stack, marker))

    with extra_worker(stack, queue, ROUTERQ_QUEUE=queue):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # The re-run sends the texts without vectors, each once: the dead worker's unfinished requests come
    # back too (through its expired lease) while the re-run's run, and a text is sent by whichever
    # request claims it first.
    sent_after = Counter(
        int(text.split()[3])
        for c in embed_calls(stack, marker)[sent_before:]
        for text in c["texts"]  # type: ignore[attr-defined]
    )
    resent = set(sent_after)
    assert not resent & embedded, f"texts embedded before were sent again: {sorted(resent & embedded)[:10]}"
    assert resent == set(range(1000)) - embedded
    twice = sorted(text for text, times in sent_after.items() if times > 1)
    assert not twice, f"{len(twice)} texts were paid for twice after the crash: {twice[:10]}"
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"d{i:04d}" for i in range(1000)]
    assert rows[640]["embedding"] == fake_embedding(f"{marker} text number 640 [[slow:0.4]]", 1536)


def test_two_runs_of_one_backfill_at_once_pay_for_each_text_once(stack: Stack, tmp_path: Path) -> None:
    """A re-run while the first run still goes (or a dead worker's request restored while a re-run's
    runs): requests for the same texts in flight together send each text once."""
    marker = uuid.uuid4().hex[:8]
    rows = [{"doc": f"d{i:02d}", "body": f"{marker} text number {i}" + (" [[slow:1]]" if i % 8 == 0 else "")}
            for i in range(64)]  # fmt: skip
    source = tmp_path / "twice.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    queue = f"embed-twice-{marker}"
    env = {**stack.env, "ROUTERQ_QUEUE": queue}
    with extra_worker(stack, queue, concurrency=32, ROUTERQ_QUEUE=queue):
        argv = [ROUTERQ, "embed", str(source), "--model", MODEL, "--id-field", "doc", "--text-field", "body",
                "--inputs-per-request", "8"]  # fmt: skip
        outputs = [["-o", str(tmp_path / f"out{n}.jsonl")] for n in range(2)]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        runs = [subprocess.Popen([*argv, *output], env=env, **pipes) for output in outputs]  # type: ignore[call-overload]
        for run in runs:
            _, stderr = run.communicate(timeout=120)
            assert run.returncode == 0, stderr
    sent = Counter(
        int(text.split()[3])
        for c in embed_calls(stack, marker)
        for text in c["texts"]  # type: ignore[attr-defined]
    )
    assert set(sent) == set(range(64))
    twice = sorted(text for text, times in sent.items() if times > 1)
    assert not twice, f"{len(twice)} of 64 texts were sent (and paid for) twice: {twice[:10]}"
    for n in range(2):
        written = [json.loads(x)["id"] for x in (tmp_path / f"out{n}.jsonl").read_text().splitlines()]
        assert written == [f"d{i:02d}" for i in range(64)]


def test_a_backfills_embedding_spans_carry_tokens_phoenix_counts_and_routerqs_cost_and_no_vectors(
    stack: Stack, tmp_path: Path
) -> None:
    """Phoenix counts tokens and prices spans of kind LLM only (phoenix/db/insertion/span.py and
    helpers.py: should_calculate_span_cost), so an embedding's tokens and cost are routerq's attributes
    on the span, as the README says; this test notices the day Phoenix counts them itself."""
    from phoenix.client import Client

    marker = uuid.uuid4().hex[:8]
    source = texts_file(tmp_path / "texts.jsonl", marker, 10)
    queue = f"emb-spans-{marker}"
    with extra_worker(stack, queue, OPENINFERENCE_HIDE_EMBEDDINGS_VECTORS="true"):
        done = routerq(
            stack, "embed", str(source), "--model", MODEL, "--id-field", "doc", "--text-field", "body",
            "-o", str(tmp_path / "v.jsonl"), env={"ROUTERQ_QUEUE": queue},
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    log = (stack.tmp / "logs" / f"{queue}.log").read_text()
    assert "PydanticSerializationUnexpectedValue" not in log  # base64 vectors are passed through on purpose
    run_id = next(w for w in done.stderr.split() if w.startswith("emb_")).rstrip(":")
    phoenix = Client(base_url=stack.phoenix.url)
    spans: list[dict[str, object]] = []

    def embedding_span_arrived() -> bool:
        nonlocal spans
        spans = list(
            phoenix.spans.get_spans(
                project_identifier=stack.project, span_kind="EMBEDDING", attributes={"session.id": run_id}
            )
        )
        return bool(spans)

    wait_for(embedding_span_arrived, f"the EMBEDDING span of {run_id} in Phoenix", timeout=60, poll=0.5)
    span = spans[0]
    attributes = span["attributes"]
    assert isinstance(attributes, dict)
    assert attributes["llm.token_count.prompt"] > 0 and attributes["llm.cost.total"] > 0
    output = json.loads(attributes["output.value"])
    assert {item["embedding"] for item in output["data"]} == {"__REDACTED__"}
    query = "query($id: ID!) { node(id: $id) { ... on Span { tokenCountTotal } } }"
    answer = httpx.post(
        f"{stack.phoenix.url}/graphql", json={"query": query, "variables": {"id": span["id"]}}
    )
    counted = answer.json()["data"]["node"]["tokenCountTotal"]
    assert counted in (0, None), "Phoenix now counts embedding tokens: update the README's note on embeddings"


def test_embed_via_batch_sends_the_requests_as_one_openrouter_batch_at_half_price_and_traces_failures(
    stack: Stack, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex[:8]
    source = texts_file(tmp_path / "texts.jsonl", marker, 300)
    lines = source.read_text().splitlines()
    lines[200] = json.dumps({"doc": "d0200", "body": f"{marker} text number 200 [[batch-status:400]]"})
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "vectors.jsonl"
    done = routerq(
        stack, "embed", str(source), "--model", MODEL, "--id-field", "doc", "--text-field", "body",
        "--inputs-per-request", "128", "--via", "batch", "-o", str(out),
    )  # fmt: skip
    assert done.returncode == 1 and "128 text(s) failed" in done.stderr, done.stderr  # request 2 of 3
    assert "sent as 1 OpenRouter batch(es)" in done.stderr
    calls = httpx.get(f"{stack.fake_base}/_fake/calls").json()["calls"]
    upstream = [c for c in calls if c.get("kind") == "batch" and any(marker in t for t in c["texts"])]
    assert [(c["endpoint"], len(c["custom_ids"])) for c in upstream] == [("/v1/embeddings", 3)]
    assert embed_calls(stack, marker) == []  # no live call

    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"d{i:04d}" for i in [*range(128), *range(256, 300)]]
    assert rows[0]["embedding"] == fake_embedding(f"{marker} text number 0", 1536)
    run_id = done.stderr.split(":")[0].strip()
    run = EmbedStore(redis.Redis.from_url(stack.redis.url), 3600).get(run_id)
    assert run is not None and (run.done, run.failed) == (172, 128)
    assert run.cost == pytest.approx(run.prompt_tokens * float(PRICES[MODEL][0]) / 2)  # the batch price

    client = Client(base_url=stack.phoenix.url)
    found: list[dict[str, object]] = []

    def failure_traced() -> bool:
        try:
            found[:] = client.spans.get_spans(
                project_identifier=stack.project, name="CreateEmbeddingResponse",
                attributes={"routerq.embed.run": run_id}, limit=10, timeout=30,
            )  # fmt: skip
        except httpx.HTTPStatusError as exc:  # 404 until the project's first span has landed
            if exc.response.status_code != 404:
                raise
        return bool(found)

    wait_for(failure_traced, "the failed request's span in Phoenix", timeout=60, poll=1)
    (failed,) = found
    assert failed["status_code"] == "ERROR" and failed["attributes"]["routerq.embed.first_index"] == 128
