"""`routerq serve` through the official `openai` Python client: files, batches, tenancy, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import Stack, line, routerq, wait_for, write_jsonl
from phoenix_queries import trace_spans

from routerq.core.batch_store import Via
from routerq.devstack.fake_openrouter import fake_answer
from routerq.devstack.localstack import Service, free_port, start_api
from routerq.producer.batch_client import BatchClient

TOKEN_A, TOKEN_B = "rq-token-a-" + uuid.uuid4().hex, "rq-token-b-" + uuid.uuid4().hex
ROOT = Path(__file__).resolve().parents[2]
MAX_UPLOAD_MB = 2  # small, so the oversize upload stays quick; the 200 MB default is a named constant


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[Service]:
    env = {**stack.env, "ROUTERQ_API_KEYS": f"{TOKEN_A},{TOKEN_B}", "ROUTERQ_FILES_DIR": str(stack.tmp / "files"),
           "ROUTERQ_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB)}  # fmt: skip
    service = start_api(env, stack.tmp / "logs", free_port())
    try:
        yield service
    finally:
        service.stop()


def client(api: Service, token: str = TOKEN_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=token, max_retries=0)


def chat_rows(marker: str, n: int) -> list[dict[str, Any]]:
    return [line(f"q{i}", "chat", f"{marker} question {i}") for i in range(n)]


def wait_batch(oai: openai.OpenAI, batch_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled"):
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} not finished after {timeout} s: {oai.batches.retrieve(batch_id)}")


def test_the_openai_client_uploads_a_file_runs_a_batch_and_reads_every_answer_in_input_order(
    stack: Stack, api: Service, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex[:8]
    rows = chat_rows(marker, 30)
    oai = client(api)
    uploaded = oai.files.create(file=write_jsonl(tmp_path / "in.jsonl", rows).open("rb"), purpose="batch")
    assert uploaded.object == "file" and uploaded.purpose == "batch" and uploaded.bytes > 0
    assert oai.files.retrieve(uploaded.id).filename == "in.jsonl"
    assert oai.files.content(uploaded.id).content == (tmp_path / "in.jsonl").read_bytes()
    batch = oai.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"team": "search"},
    )  # fmt: skip
    assert batch.status in ("validating", "in_progress", "completed") and batch.metadata == {"team": "search"}
    done = wait_batch(oai, batch.id)
    assert (
        done.status == "completed" and done.request_counts.completed == 30 and done.request_counts.failed == 0
    )
    assert done.output_file_id and done.error_file_id is None
    out = [json.loads(x) for x in oai.files.content(done.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == [f"q{i}" for i in range(30)]
    for i, o in enumerate(out):
        body = o["response"]["body"]
        answer = body["choices"][0]["message"]["content"]
        assert answer == fake_answer(body["model"], f"{marker} question {i}")
    status = routerq(stack, "status", batch.id)  # the same batch, seen by the CLI
    assert status.returncode == 0 and "30 succeeded" in status.stdout
    listed = oai.batches.list(limit=100)
    assert batch.id in [b.id for b in listed.data]
    assert uploaded.id in [f.id for f in oai.files.list().data]


def test_failed_lines_go_to_the_error_file_and_cancel_and_paging_work(api: Service, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex[:8]
    rows = [line(f"e{i}", "chat", f"{marker} {i}" + (" [[status:400]]" if i == 1 else "")) for i in range(3)]
    oai = client(api)
    uploaded = oai.files.create(file=write_jsonl(tmp_path / "e.jsonl", rows).open("rb"), purpose="batch")
    done = wait_batch(oai, oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                               completion_window="24h").id)  # fmt: skip
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    errors = [json.loads(x) for x in oai.files.content(done.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in errors] == ["e1"] and errors[0]["error"]["code"]

    slow = [line(f"s{i}", "chat", f"{marker} slow {i} [[slow:2]]") for i in range(40)]
    uploaded = oai.files.create(file=write_jsonl(tmp_path / "s.jsonl", slow).open("rb"), purpose="batch")
    batch = oai.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelled = oai.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    assert wait_batch(oai, batch.id).status == "cancelled"

    first = oai.batches.list(limit=1)
    assert len(first.data) == 1 and first.has_more
    second = oai.batches.list(limit=1, after=first.data[0].id)
    assert second.data[0].id != first.data[0].id


def test_a_wrong_token_is_refused_and_another_tokens_batch_and_file_are_not_found(
    api: Service, tmp_path: Path
) -> None:
    rows = chat_rows(uuid.uuid4().hex[:8], 2)
    mine = client(api, TOKEN_A)
    uploaded = mine.files.create(file=write_jsonl(tmp_path / "t.jsonl", rows).open("rb"), purpose="batch")
    batch = mine.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.AuthenticationError):
        client(api, "not-a-token").batches.retrieve(batch.id)
    theirs = client(api, TOKEN_B)
    with pytest.raises(openai.NotFoundError):
        theirs.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        theirs.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        theirs.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert batch.id not in [b.id for b in theirs.batches.list(limit=100).data]
    log = api.log()
    assert TOKEN_A not in log and TOKEN_B not in log and "not-a-token" not in log


def test_a_malformed_file_is_refused_with_its_line_numbers_and_an_oversize_one_with_413(
    api: Service, tmp_path: Path
) -> None:
    oai = client(api)
    good = json.dumps(line("a", "chat", "fine"))
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [good, "{not json", good.replace('"a"', '"b"'), json.dumps(line("a", "chat", "again"))],
    )
    with pytest.raises(openai.BadRequestError) as refused:
        oai.files.create(file=bad.open("rb"), purpose="batch")
    message = str(refused.value)
    assert "bad.jsonl:2: invalid_json_line" in message and "bad.jsonl:4: duplicate_custom_id" in message

    mixed = write_jsonl(tmp_path / "mixed.jsonl", [line("c", "chat", "x"), line("e", "embedding", "y")])
    uploaded = oai.files.create(file=mixed.open("rb"), purpose="batch")
    with pytest.raises(openai.BadRequestError) as mismatch:
        oai.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert "line 2: url /v1/embeddings differs" in str(mismatch.value)

    big = tmp_path / "big.jsonl"
    row = json.dumps(line("x", "chat", "y" * 1000))
    with big.open("w") as out:
        for i in range(MAX_UPLOAD_MB * 1_000):
            out.write(row.replace('"x"', f'"x{i}"') + "\n")
    with pytest.raises(openai.APIStatusError) as oversize:
        oai.files.create(file=big.open("rb"), purpose="batch")
    assert oversize.value.status_code == 413

    def chunks() -> Iterator[bytes]:  # chunked, no Content-Length, as the npm client streams
        boundary = b"--rq\r\n"
        yield boundary + b'Content-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        with big.open("rb") as handle:
            yield from iter(lambda: handle.read(1 << 16), b"")
        yield b"\r\n--rq--\r\n"

    chunked = httpx.post(f"{api.url}/v1/files", content=chunks(), timeout=60,
                         headers={"authorization": f"Bearer {TOKEN_A}", "content-type": "multipart/form-data; boundary=rq"})  # fmt: skip
    assert chunked.status_code == 413, chunked.text


def test_a_callers_traceparent_puts_the_submit_into_the_callers_trace(
    stack: Stack, api: Service, tmp_path: Path
) -> None:
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    oai = client(api)
    uploaded = oai.files.create(
        file=write_jsonl(tmp_path / "tp.jsonl", chat_rows("tp", 1)).open("rb"), purpose="batch"
    )
    oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                       extra_headers={"traceparent": traceparent})  # fmt: skip
    # `routerq serve` sends its spans every few seconds; the project may not exist in Phoenix before
    spans = trace_spans(stack.phoenix.url, stack.project, trace_id, expect=1)
    assert [s["name"] for s in spans] == ["routerq.submit"], spans


def test_the_openai_npm_client_round_trips_a_batch_and_its_trace_continues_into_routerq(
    stack: Stack, api: Service, tmp_path: Path
) -> None:
    """examples/node-producer: the official `openai` npm client, traced with OpenInference JS."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed here: the Node.js producer cannot be checked")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout
    if int(version.strip().lstrip("v").split(".")[0]) < 18:
        pytest.skip(f"node {version.strip()} is older than 18: the Node.js producer cannot be checked")
    project = shutil.copytree(ROOT / "examples" / "node-producer", tmp_path / "node-producer",
                              ignore=shutil.ignore_patterns("node_modules"))  # fmt: skip
    installed = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=project, capture_output=True,
                               text=True, timeout=300)  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    marker = uuid.uuid4().hex[:8]
    source = write_jsonl(tmp_path / "node.jsonl", chat_rows(marker, 5))
    env = {**os.environ, "ROUTERQ_API_URL": f"{api.url}/v1", "ROUTERQ_API_KEY": TOKEN_A,
           "PHOENIX_COLLECTOR_ENDPOINT": stack.phoenix.url, "PHOENIX_PROJECT_NAME": stack.project}  # fmt: skip
    ran = subprocess.run([node, "producer.mjs", str(source)], cwd=project, env=env, capture_output=True,
                         text=True, timeout=180)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    assert result["status"] == "completed" and result["counts"]["completed"] == 5
    assert [o["custom_id"] for o in result["output"]] == [f"q{i}" for i in range(5)]
    for i, o in enumerate(result["output"]):
        body = o["response"]["body"]
        assert body["choices"][0]["message"]["content"] == fake_answer(
            body["model"], f"{marker} question {i}"
        )

    spans = trace_spans(stack.phoenix.url, stack.project, result["trace_id"], expect=2)
    by_name = {s["name"]: s for s in spans}
    assert set(by_name) == {"node.submit-batch", "routerq.submit"}, spans
    assert by_name["routerq.submit"]["parent_id"] == by_name["node.submit-batch"]["context"]["span_id"]


def test_the_openai_client_asks_for_openrouters_batch_price_with_a_metadata_key(
    stack: Stack, api: Service, tmp_path: Path
) -> None:
    """`metadata={"routerq_via": "batch"}`: the lines go as one OpenRouter batch, and the client reads
    the results exactly as for a live batch."""
    marker = uuid.uuid4().hex[:8]
    oai = client(api)
    uploaded = oai.files.create(
        file=write_jsonl(tmp_path / "via.jsonl", chat_rows(marker, 4)).open("rb"), purpose="batch"
    )
    batch = oai.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"routerq_via": "batch"},
    )  # fmt: skip
    done = wait_batch(oai, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 4
    out = [json.loads(x) for x in oai.files.content(done.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == [f"q{i}" for i in range(4)]
    assert out[0]["response"]["body"]["id"].startswith("gen-batch-")  # answered by the Batch API
    calls = httpx.get(f"{stack.fake_base}/_fake/calls").json()["calls"]
    assert [c["kind"] for c in calls if marker in json.dumps(c)] == ["batch"]  # no live call
    with pytest.raises(openai.BadRequestError, match="routerq_via"):
        oai.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={"routerq_via": "cheap"},
        )  # fmt: skip


def scrape(url: str, token: str | None) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{url}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    samples = {}
    for row in response.text.splitlines():
        if row and not row.startswith("#"):
            name, value = row.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_count_lines_by_route_and_outcome_and_want_their_token_when_one_is_set(
    stack: Stack, tmp_path: Path
) -> None:
    token = "rq-metrics-" + uuid.uuid4().hex
    env = {**stack.env, "ROUTERQ_METRICS_TOKEN": token, "ROUTERQ_API_KEYS": TOKEN_A,
           "ROUTERQ_FILES_DIR": str(tmp_path / "files")}  # fmt: skip
    service = start_api(env, stack.tmp / "logs", free_port())
    try:
        refused = httpx.get(f"{service.url}/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert (
            httpx.get(f"{service.url}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        before = scrape(service.url, token)
        marker = uuid.uuid4().hex[:8]
        live_rows = chat_rows(marker, 3)
        live_rows[2] = line("q2", "chat", f"{marker} question 2 [[status:400]]")
        batches = BatchClient(stack.settings(), tracing=False)
        live = batches.submit(write_jsonl(tmp_path / "live.jsonl", live_rows)).batch
        via = batches.submit(
            write_jsonl(tmp_path / "via.jsonl", chat_rows(marker + "b", 2)), via=Via.BATCH
        ).batch
        for batch_id in (live.id, via.id):
            wait_for(lambda b=batch_id: batches.get(b).status.final, f"batch {batch_id} to end", timeout=120)
        after = scrape(service.url, token)
    finally:
        service.stop()

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew('routerq_lines_total{via="live",outcome="succeeded"}') == 2
    assert grew('routerq_lines_total{via="live",outcome="failed"}') == 1
    assert grew('routerq_lines_total{via="batch",outcome="succeeded"}') == 2
    assert grew('routerq_upstream_batches_total{status="completed"}') == 1
    assert after["routerq_upstream_batches_open"] == before.get("routerq_upstream_batches_open", 0)
    spent = batches.get(live.id).cost + batches.get(via.id).cost
    assert grew("routerq_spend_usd_total") == pytest.approx(spent, rel=1e-6)
    assert grew('routerq_tokens_total{kind="prompt"}') > 0


def test_the_servers_log_masks_tokens_and_the_openrouter_key_wherever_a_request_put_them(
    stack: Stack, api: Service
) -> None:
    """A token and the OpenRouter key in a path, a query, a header and a body: every request is in
    the log, and neither secret is."""
    auth = {"Authorization": f"Bearer {TOKEN_A}"}
    for secret in (TOKEN_B, stack.api_key):
        assert httpx.get(f"{api.url}/v1/files/{secret}", headers=auth).status_code == 404
        assert httpx.get(f"{api.url}/v1/batches?after={secret}", headers=auth).status_code in (200, 400)
        httpx.get(f"{api.url}/v1/batches", headers={**auth, "X-Leak": secret})
        body = {"input_file_id": secret, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        assert httpx.post(f"{api.url}/v1/batches", headers=auth, json=body).status_code == 404
    wait_for(lambda: api.log().count("/v1/files/[REDACTED]") >= 2, "the access lines of both requests")
    log = api.log()
    assert TOKEN_A not in log and TOKEN_B not in log and stack.api_key not in log
    assert "Logging error" not in log and log.count("[REDACTED]") >= 4


def test_a_no_auth_server_on_the_same_redis_cannot_read_a_token_holders_batch_or_results(
    stack: Stack, api: Service, tmp_path: Path
) -> None:
    oai = client(api)
    uploaded = oai.files.create(
        file=write_jsonl(tmp_path / "mine.jsonl", chat_rows("mine", 1)).open("rb"), purpose="batch"
    )
    batch = oai.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_batch(oai, batch.id)
    open_env = {k: v for k, v in stack.env.items() if k != "ROUTERQ_API_KEYS"}
    loopback = start_api(
        {**open_env, "ROUTERQ_FILES_DIR": str(tmp_path / "open")},
        stack.tmp / "logs",
        free_port(),
        "--no-auth",
    )
    try:
        for path in (
            f"/v1/batches/{batch.id}",
            f"/v1/files/{done.output_file_id}/content",
            f"/v1/files/{uploaded.id}",
        ):
            assert httpx.get(f"{loopback.url}{path}").status_code == 404, path
        assert httpx.get(f"{loopback.url}/v1/batches").json()["data"] == []
    finally:
        loopback.stop()


def test_an_unwritable_files_dir_stops_serve_at_once_with_one_line_and_exit_2(
    stack: Stack, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    env = {**stack.env, "ROUTERQ_API_KEYS": TOKEN_A, "ROUTERQ_FILES_DIR": str(not_a_dir / "files")}
    done = routerq(stack, "serve", "--port", str(free_port()), env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "ROUTERQ_FILES_DIR" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
