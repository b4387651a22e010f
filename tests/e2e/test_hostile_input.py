"""Hostile and careless input against a real `routerq serve` on a Redis of its own: every malformed
request is an OpenAI-shaped 4xx with a clear message, stores nothing (Redis keys and files counted
before and after), leaves the server answering, and puts no secret in its log. Then Redis killed and
frozen under it: 503s within seconds, and back on its own."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import Stack, line, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routerq.core.settings import DEFAULT_MAX_LINE_MB
from routerq.devstack.localstack import Service, free_port, start_api, start_redis

TOKEN = "rq-hostile-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHAT = "/v1/chat/completions"


@dataclass
class Server:
    api: Service
    redis: Service
    files: Path
    client: redis.Redis
    api_key: str

    def stored(self) -> tuple[int, list[str]]:
        return int(self.client.dbsize()), sorted(p.name for p in self.files.iterdir())


@pytest.fixture(scope="module")
def server(stack: Stack) -> Iterator[Server]:
    own_redis = start_redis(free_port(), stack.tmp / f"hostile-redis-{uuid.uuid4().hex[:6]}")
    files = stack.tmp / "hostile-files"
    env = {
        **stack.env,
        "REDIS_URL": own_redis.url,
        "ROUTERQ_API_KEYS": TOKEN,
        "ROUTERQ_FILES_DIR": str(files),
    }
    api = start_api(env, stack.tmp / "logs", free_port())
    try:
        yield Server(api, own_redis, files, redis.Redis.from_url(own_redis.url), stack.api_key)
    finally:
        api.stop()
        own_redis.stop()
    assert TOKEN not in api.log() and stack.api_key not in api.log()


def refused(response: httpx.Response, status: int, says: str = "") -> dict[str, Any]:
    """An OpenAI-shaped error with this status and, in its message, `says`."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert says.lower() in error["message"].lower(), error["message"][:500]
    return dict(error)


@contextmanager
def nothing_stored(server: Server) -> Iterator[None]:
    before = server.stored()
    yield
    assert server.stored() == before, "a refused request left something in Redis or on disk"
    assert httpx.get(f"{server.api.url}/healthz").status_code == 200, "the server stopped answering"


def upload(server: Server, content: bytes, filename: str = "in.jsonl") -> httpx.Response:
    files = {"file": (filename, content, "application/jsonl")}
    return httpx.post(
        f"{server.api.url}/v1/files", headers=AUTH, files=files, data={"purpose": "batch"}, timeout=60
    )


def jsonl(*rows: Any) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def good(custom_id: str = "a") -> dict[str, Any]:
    return line(custom_id, "chat", "hello")


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


BAD_LINES = {
    "a url that is a list": ({**good(), "url": [CHAT]}, "invalid_url"),
    "a url that is an object": ({**good(), "url": {"a": CHAT}}, "invalid_url"),
    "a line nested 20,000 deep": (b'{"custom_id": "a", "body": ' + deep(20_000) + b"}", "nested too deeply"),
    "a lone surrogate in custom_id": (b'{"custom_id": "\\ud800", "method": "POST"}', "surrogate"),
    "a 300 KB custom_id": ({**good(), "custom_id": "x" * 300_000}, "longer than 512"),
    "a method that is 100 KB": ({**good(), "method": "P" * 100_000}, "method must be POST"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_line_is_a_400_naming_its_line_and_stores_no_file(server: Server, case: str) -> None:
    bad, says = BAD_LINES[case]
    with nothing_stored(server):
        response = upload(server, jsonl(good("first"), bad))
        error = refused(response, 400, says)
    assert ":2: " in error["message"] and len(response.content) < 4_000  # its line; no echo of the value


def test_a_line_longer_than_the_default_cap_is_a_413_and_is_never_kept(server: Server) -> None:
    huge = {
        **good(),
        "body": {
            "model": "m",
            "messages": [{"role": "user", "content": "y" * int(DEFAULT_MAX_LINE_MB * 1e6)}],
        },
    }
    with nothing_stored(server):
        refused(
            upload(server, jsonl(good("first"), huge, good("last"))),
            413,
            f"{int(DEFAULT_MAX_LINE_MB * 1e6)} bytes",
        )


def test_an_upload_name_with_control_characters_is_stored_and_shown_clean(server: Server) -> None:
    response = upload(server, jsonl(good()), filename="\x1b[2J\x1b[31mevil\x07" + "n" * 1000 + ".jsonl")
    assert response.status_code == 200, response.text
    name = response.json()["filename"]
    assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name) and len(name) <= 255
    assert name.startswith("_[2J_[31mevil")  # the ESCs made harmless (httpx sends BEL as %07)
    assert httpx.delete(f"{server.api.url}/v1/files/{response.json()['id']}", headers=AUTH).status_code == 200
    assert not list(server.files.iterdir())  # deleted with its record


def create(server: Server, body: Any = None, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    return httpx.post(f"{server.api.url}/v1/batches", headers=headers, content=content, timeout=30)


@pytest.fixture(scope="module")
def file_id(server: Server) -> str:
    response = upload(server, jsonl(good()))
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def batch_body(file_id: str, **changes: Any) -> dict[str, Any]:
    return {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", **changes}


def test_bad_batch_requests_are_400s_or_413s_and_store_nothing(server: Server, file_id: str) -> None:
    cases: list[tuple[Any, bytes | None, int, str]] = [
        (batch_body(file_id, endpoint=[CHAT]), None, 400, "endpoint must be"),
        (batch_body(file_id, completion_window=["24h"]), None, 400, "completion_window"),
        (batch_body(file_id, metadata={"k": ["v"]}), None, 400, "metadata"),
        (
            None,
            b'{"input_file_id": "%s", "endpoint": "%s", "metadata": {"k": "\\ud800"}}'
            % (file_id.encode(), CHAT.encode()),
            400,
            "surrogate",
        ),
        (None, b'{"metadata": ' + deep(20_000) + b"}", 400, "nested too deeply"),
        (None, b"{not json", 400, "not valid JSON"),
        (None, b'{"pad": "' + b"z" * 1_100_000 + b'"}', 413, "ROUTERQ_MAX_REQUEST_KB"),
        (batch_body("file-" + "0" * 24), None, 404, "no such file"),
        (batch_body("x" * 100_000), None, 404, "no such file"),
    ]
    for body, raw, status, says in cases:
        with nothing_stored(server):
            response = create(server, body, raw)
            refused(response, status, says)
            assert len(response.content) < 4_000


def test_unknown_routes_wrong_methods_and_bad_paging_are_openai_shaped(server: Server) -> None:
    with nothing_stored(server):
        refused(httpx.get(f"{server.api.url}/v1/nope", headers=AUTH), 404, "not found")
        refused(httpx.put(f"{server.api.url}/v1/files", headers=AUTH), 405, "not allowed")
        refused(httpx.get(f"{server.api.url}/v1/batches", params={"limit": "²"}, headers=AUTH), 400, "limit")
        refused(httpx.get(f"{server.api.url}/v1/files", params={"limit": "0"}, headers=AUTH), 400, "limit")


def test_a_batch_id_with_a_suffix_is_not_found_exactly_like_an_unknown_one(
    server: Server, file_id: str
) -> None:
    made = create(server, batch_body(file_id))
    assert made.status_code == 200, made.text
    batch_id = made.json()["id"]
    unknown = refused(httpx.get(f"{server.api.url}/v1/batches/batch_{'0' * 24}", headers=AUTH), 404)
    for suffix in (":in", ":out", ":held", ":stats", "/../x"):
        found = refused(httpx.get(f"{server.api.url}/v1/batches/{batch_id}{suffix}", headers=AUTH), 404)
        assert found["code"] == unknown["code"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {},
            optional={
                "input_file_id": json_values,
                "endpoint": st.sampled_from([CHAT, "/v1/x"]) | json_values,
                "completion_window": st.just("24h") | json_values,
                "metadata": json_values,
            },
        ),
    )
)
def test_any_json_body_is_answered_with_a_4xx_never_a_500(server: Server, body: Any) -> None:
    before = server.stored()
    response = create(server, body)
    assert response.status_code in (400, 404, 413), (body, response.status_code, response.text[:300])
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert server.stored() == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=st.one_of(json_values, st.binary(max_size=200)))
def test_any_jsonl_line_is_a_400_with_its_line_number_never_a_500(server: Server, row: Any) -> None:
    before = server.stored()
    raw = row.replace(b"\n", b" ") if isinstance(row, bytes) else json.dumps(row).encode()
    response = upload(server, jsonl(raw if raw.strip() else b"null"))
    assert response.status_code == 400, (row, response.status_code, response.text[:300])
    assert ":1: " in response.json()["error"]["message"]
    assert server.stored() == before


def within(seconds: float, request: Any) -> httpx.Response:
    started = time.monotonic()
    response: httpx.Response = request()
    assert time.monotonic() - started < seconds, f"answered after {time.monotonic() - started:.1f} s"
    return response


def test_redis_killed_or_frozen_answers_503_within_seconds_and_recovers_on_its_own(
    server: Server, file_id: str, stack: Stack
) -> None:
    url = server.api.url

    def listing() -> httpx.Response:
        return httpx.get(f"{url}/v1/batches", headers=AUTH, timeout=30)

    server.redis.process.send_signal(signal.SIGSTOP)  # frozen: connections open, no answers
    try:
        error = refused(within(8, listing), 503, "unavailable")
        assert error["code"] == "service_unavailable"
        health = within(8, lambda: httpx.get(f"{url}/healthz", timeout=30))
        assert health.status_code == 503 and "127.0.0.1" not in health.text and health.headers["Retry-After"]
    finally:
        server.redis.process.send_signal(signal.SIGCONT)
    wait_for(lambda: listing().status_code == 200, "the API to answer again after Redis thawed", timeout=30)

    port = server.redis.url.rsplit(":", 1)[1].split("/")[0]
    server.redis.stop(signal.SIGKILL)
    refused(within(8, listing), 503, "unavailable")
    refused(within(8, lambda: create(server, batch_body(file_id))), 503, "unavailable")
    server.redis = start_redis(int(port), Path(server.redis.log_path).parent)  # its data survives (AOF)
    wait_for(
        lambda: listing().status_code == 200, "the API to answer again after Redis restarted", timeout=30
    )
