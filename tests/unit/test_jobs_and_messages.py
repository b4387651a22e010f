"""Jobs, their endpoints and estimates, vectors, and the queue messages that carry them."""

from __future__ import annotations

import base64
import json
import struct

import pytest
import redis
from pydantic import ValidationError

from routerq.core import envelope
from routerq.core.broker import LINE_TASK_NAME
from routerq.core.errors import SettingsError
from routerq.core.jobs import Job, JobKind, embedding_vector
from routerq.core.redis_client import describe
from routerq.core.settings import VISIBILITY_SLACK, Settings, load_settings
from routerq.core.vectors import from_float32
from routerq.devstack.demo import LOCAL_KEY, export_lines
from routerq.worker.upstream.cost_estimate import estimate_tokens


def test_each_kind_knows_its_openrouter_path_and_batch_url() -> None:
    assert [k.path for k in JobKind] == ["/chat/completions", "/completions", "/embeddings"]
    assert [k.url for k in JobKind] == ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        (JobKind.CHAT, {"messages": []}, "needs a model"),
        (JobKind.CHAT, {"model": "m", "messages": [], "stream": True}, "streaming is not supported"),
        (JobKind.COMPLETION, {"model": "m", "messages": []}, "needs `prompt`"),
        (JobKind.EMBEDDING, {"model": "m", "prompt": "x"}, "needs `input`"),
    ],
)
def test_a_job_that_cannot_be_sent_is_refused_before_it_is_queued(
    kind: JobKind, body: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Job(kind=kind, body=body)


def test_fallback_models_are_all_models_the_job_may_be_served_by() -> None:
    job = Job(kind=JobKind.CHAT, body={"model": "a", "models": ["a", "b"], "messages": []})
    assert job.models == ["a", "b"]


def test_token_estimate_is_prompt_size_plus_the_completion_budget() -> None:
    prompt = {"messages": [{"role": "user", "content": "x" * 400}]}
    base = len(json.dumps(prompt["messages"])) // 4
    assert estimate_tokens(prompt) == base + 256
    assert estimate_tokens({**prompt, "max_tokens": 1000}) == base + 1000
    assert estimate_tokens({**prompt, "max_completion_tokens": "50"}) == base + 50
    assert estimate_tokens({"input": "abcd" * 10}) == len(json.dumps("abcd" * 10)) // 4 + 256


def test_vectors_decode_from_base64_float32_and_pass_through_as_floats() -> None:
    raw = struct.pack("<3f", 0.5, -1.0, 2.25)
    assert from_float32(raw) == [0.5, -1.0, 2.25]
    assert embedding_vector(base64.b64encode(raw).decode()) == [0.5, -1.0, 2.25]
    assert embedding_vector([0.1, 0.2]) == [0.1, 0.2]


def test_a_queued_message_reads_back_as_its_task_id_and_args() -> None:
    args = ["batch_1", [7, 8], 1.5]  # what a producer stages for a batch's lines (run_lines)
    raw = envelope.build("abc", envelope.headers(LINE_TASK_NAME, "abc", args), args, "routerq")
    assert envelope.parse(raw) == envelope.Message(LINE_TASK_NAME, "abc", args)
    unacked = json.dumps([json.loads(raw), "", "routerq"])  # kombu's unacked hash entry
    assert envelope.parse(unacked) == envelope.parse(raw)


def test_a_message_built_without_celery_is_the_one_celery_would_publish() -> None:
    """Producers publish without importing Celery; a worker must not be able to tell the difference."""
    from celery import Celery

    args = [{"id": "job_1", "body": {"model": "m"}}]
    celery_headers = (
        Celery(broker="memory://")
        .amqp.as_task_v2("job_1", "routerq.run_job", args=args, kwargs={}, ignore_result=True)
        .headers
    )
    assert envelope.headers("routerq.run_job", "job_1", args) == celery_headers
    assert envelope.parse(envelope.build("job_1", celery_headers, args, "q")) == envelope.Message(
        "routerq.run_job", "job_1", args
    )


@pytest.mark.parametrize("raw", [b"", b"not json", b"{}", b'{"headers": {}, "body": "!!"}', b"[]"])
def test_anything_else_on_a_queue_is_not_a_message(raw: bytes) -> None:
    assert envelope.parse(raw) is None


def test_settings_refuse_a_visibility_timeout_that_would_deliver_running_jobs_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ROUTERQ_VISIBILITY_TIMEOUT", "60")
    with pytest.raises(SettingsError, match="ROUTERQ_VISIBILITY_TIMEOUT"):
        load_settings()


def test_a_bad_value_is_one_line_naming_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "http://localhost")
    with pytest.raises(SettingsError, match=r"REDIS_URL: .*must start with redis://"):
        load_settings()


def test_the_defaults_are_consistent() -> None:
    """The defaults pass the validator's own rule: a running job or a waiting retry, plus the slack,
    fits in the visibility timeout (else a job is delivered twice)."""
    settings = Settings()
    assert (
        settings.job_time_limit + settings.retry_max_delay + VISIBILITY_SLACK <= settings.visibility_timeout
    )


def test_the_demo_prints_export_lines_for_its_stack_but_never_a_real_key() -> None:
    env = {"REDIS_URL": "redis://127.0.0.1:6380/0", "OPENROUTER_API_KEY": LOCAL_KEY}
    assert export_lines(env).splitlines() == [
        "export REDIS_URL=redis://127.0.0.1:6380/0",
        f"export OPENROUTER_API_KEY={LOCAL_KEY}",
    ]
    assert "sk-or-v1-real" not in export_lines({**env, "OPENROUTER_API_KEY": "sk-or-v1-real"})


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@localhost:6390/2", "redis://localhost:6390/2"),
        ("rediss://user:s3cret@cache.example:6380/0?ssl_ca_certs=/ca.pem", "rediss://cache.example:6380/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_a_redis_url_in_a_message_never_shows_its_password(url: str, shown: str) -> None:
    assert describe(url) == shown


def test_a_redis_password_with_url_characters_reaches_redis_intact() -> None:
    password = "p@ss:w/rd#1 %"
    settings = Settings(REDIS_URL="redis://cache:6379/0", REDIS_PASSWORD=password)
    parsed = redis.connection.parse_url(settings.redis_url)
    assert (parsed["password"], parsed["host"], parsed["port"], parsed["db"]) == (password, "cache", 6379, 0)
    assert password in settings.secrets and describe(settings.redis_url) == "redis://cache:6379/0"


def test_a_password_in_both_places_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:one@cache:6379/0")
    monkeypatch.setenv("REDIS_PASSWORD", "two")
    with pytest.raises(SettingsError, match="REDIS_PASSWORD is set and REDIS_URL has a password too"):
        load_settings()
