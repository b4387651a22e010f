"""Secrets stay secret, tracing trouble never fails a job, the deployment files match the settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
import trustme
from conftest import Stack, extra_worker, line, wait_final, write_jsonl
from phoenix_queries import all_spans, trace_spans

from routerq.core import telemetry
from routerq.core.jobs import Job, JobKind
from routerq.devstack.localstack import TLSFiles, free_port, start_redis
from routerq.producer import Producer
from routerq.producer.batch_client import BatchClient

ROOT = Path(__file__).resolve().parents[2]
CHAT = "meta-llama/llama-3.1-8b-instruct"


def test_tracing_trouble_never_fails_a_job(stack: Stack) -> None:
    """Phoenix unreachable: no span export, no price registration, and the job still succeeds."""
    dead_phoenix = "http://127.0.0.1:9"
    with extra_worker(stack, "no-phoenix", PHOENIX_COLLECTOR_ENDPOINT=dead_phoenix) as (worker, settings):
        producer = Producer(settings, tracing=False)
        job = Job(
            kind=JobKind.CHAT, body={"model": CHAT, "messages": [{"role": "user", "content": "still works"}]}
        )
        result = producer.run(job, timeout=60)
        assert result.ok, result.error
        assert "cannot register the price" in worker.log()


def test_tracing_can_be_switched_off(stack: Stack) -> None:
    with extra_worker(stack, "untraced", ROUTERQ_TRACING="false") as (_, settings):
        producer = Producer(settings, tracing=False)
        job = Job(
            kind=JobKind.CHAT, body={"model": CHAT, "messages": [{"role": "user", "content": "untraced"}]}
        )
        result = producer.run(job, timeout=60)
        assert result.ok and result.trace_id is None


def test_the_api_key_appears_in_no_span_log_or_stored_result(stack: Stack) -> None:
    producer = Producer(stack.settings())
    results = [
        producer.run(
            Job(kind=JobKind.CHAT, body={"model": CHAT, "messages": [{"role": "user", "content": prompt}]})
        )
        for prompt in ("a normal answer", "a failure [[status:500]]", "a moderated one [[status:403]]")
    ]
    telemetry.flush()
    for result in results:  # these three traces whole (3 spans or more each) before searching every span
        assert result.trace_id, result
        trace_spans(stack.phoenix.url, stack.project, result.trace_id, expect=3)

    spans = all_spans(stack.phoenix.url, stack.project)
    assert stack.api_key not in json.dumps(spans)

    assert "HTTP Request: POST" in stack.worker.log()  # the session worker logs at DEBUG: everything
    assert stack.api_key not in stack.worker.log()

    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    values = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            values.append(client.get(key) or b"")
        elif kind == b"list":
            values.extend(client.lrange(key, 0, -1))
        elif kind == b"hash":
            values.extend(client.hgetall(key).values())
    assert any(b"a normal answer" in v for v in values)
    assert not any(stack.api_key.encode() in v for v in values)


def test_redis_over_tls_with_a_password_carries_jobs_and_batches(stack: Stack, tmp_path: Path) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    tls = TLSFiles(cert=tmp_path / "redis.crt", key=tmp_path / "redis.key", ca=tmp_path / "ca.crt")
    issued.cert_chain_pems[0].write_to_path(str(tls.cert))
    issued.private_key_pem.write_to_path(str(tls.key))
    ca.cert_pem.write_to_path(str(tls.ca))
    port = free_port()
    own = start_redis(port, tmp_path / "redis", password="tls-redis-pw", tls=tls)
    try:
        assert own.url.startswith("rediss://:tls-redis-pw@")
        with extra_worker(stack, "tls", REDIS_URL=own.url) as (_, settings):
            job = Job(
                kind=JobKind.CHAT, body={"model": CHAT, "messages": [{"role": "user", "content": "tls"}]}
            )
            assert Producer(settings, tracing=False).run(job, timeout=60).ok
            client = BatchClient(settings, tracing=False)
            rows = [line(f"t{i}", "chat", f"over tls {i}") for i in range(5)]
            batch = client.submit(write_jsonl(tmp_path / "tls.jsonl", rows)).batch
            assert wait_final(client, batch.id, timeout=60).succeeded == 5
        plain = redis.Redis(port=port, password="tls-redis-pw", socket_timeout=2, socket_connect_timeout=2)
        with pytest.raises(redis.RedisError):  # the port speaks TLS only: all of the above was encrypted
            plain.ping()
    finally:
        own.stop()
