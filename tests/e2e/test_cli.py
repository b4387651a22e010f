"""What a user sees from the `routerq` command."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import redis
from conftest import Stack, calls_with, line, routerq, write_jsonl

from routerq.core.batch_store import Batch, BatchStatus, BatchStore, new_batch_id
from routerq.devstack.fake_openrouter import fake_answer

CHAT = "meta-llama/llama-3.1-8b-instruct"


def test_enqueue_wait_prints_the_chat_answer(stack: Stack) -> None:
    done = routerq(
        stack, "enqueue", "--model", CHAT, "--session", "S1", "--user", "U1",
        "--metadata", "team=search", "--tag", "nightly", "--wait", "Write a haiku about observability.",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == fake_answer(CHAT, "Write a haiku about observability.")


def test_enqueue_wait_prints_the_embedding_size(stack: Stack) -> None:
    done = routerq(
        stack, "enqueue", "--embed", "--model", "openai/text-embedding-3-small", "--wait", "some text"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1 embedding(s) of dimension 1536"


def test_enqueue_wait_prints_the_completion_text(stack: Stack) -> None:
    model = "mistralai/mistral-7b-instruct"
    done = routerq(stack, "enqueue", "--completion", "--model", model, "--wait", "Once upon a time")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == fake_answer(model, "Once upon a time")


def test_enqueue_without_wait_prints_the_job_id(stack: Stack) -> None:
    done = routerq(stack, "enqueue", "--model", CHAT, "hello")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"job_[0-9a-f]{32}", done.stdout.strip())


def test_a_failed_job_exits_non_zero_with_openrouters_message(stack: Stack) -> None:
    done = routerq(stack, "enqueue", "--model", CHAT, "--wait", "moderate me [[status:403]]")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "HTTP 403" in done.stderr and "Input flagged by moderation" in done.stderr


def test_an_unknown_model_fails_with_openrouters_message(stack: Stack) -> None:
    done = routerq(stack, "enqueue", "--model", "nobody/no-such-model", "--wait", "hi")
    assert done.returncode == 1
    assert "nobody/no-such-model is not a valid model ID" in done.stderr


def test_invalid_settings_fail_at_start_naming_the_variable(stack: Stack) -> None:
    for name, value in [
        ("REDIS_URL", "localhost:6379"),
        ("OPENROUTER_TIMEOUT", "soon"),
        ("ROUTERQ_TRACING", "maybe"),
    ]:
        for command in (["worker"], ["enqueue", "hi"]):
            done = routerq(stack, *command, env={name: value}, timeout=60)
            assert done.returncode == 2, (name, command, done.stderr)
            assert name in done.stderr, done.stderr


def test_a_worker_with_a_rejected_api_key_refuses_to_start(stack: Stack) -> None:
    done = routerq(stack, "worker", env={"OPENROUTER_API_KEY": "sk-or-v1-wrong"}, timeout=60)
    assert done.returncode == 2
    assert "OPENROUTER_API_KEY was rejected" in done.stderr
    assert "sk-or-v1-wrong" not in done.stderr
    done = routerq(stack, "worker", env={"OPENROUTER_API_KEY": ""}, timeout=60)
    assert done.returncode == 2
    assert "OPENROUTER_API_KEY is not set" in done.stderr


def test_result_fetches_an_enqueued_jobs_answer_later_by_its_id(stack: Stack) -> None:
    queued = routerq(stack, "enqueue", "fetch me later")
    assert queued.returncode == 0, queued.stderr
    job_id = queued.stdout.strip()
    done = routerq(stack, "result", job_id, "--wait", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == fake_answer("meta-llama/llama-3.1-8b-instruct", "fetch me later")


def test_result_of_an_unknown_job_says_no_such_job_and_exits_5_even_with_wait(stack: Stack) -> None:
    for wait in ([], ["--wait"]):  # --wait used to wait out its whole timeout for an id nobody queued
        done = routerq(stack, "result", "job_doesnotexist", *wait, timeout=30)
        assert done.returncode == 5 and "no such job: job_doesnotexist" in done.stderr, done.stderr


def test_result_of_a_job_still_queued_exits_4(stack: Stack) -> None:
    queue = {"ROUTERQ_QUEUE": f"nobody-consumes-{uuid.uuid4().hex[:8]}"}
    queued = routerq(stack, "enqueue", "nobody takes me", env=queue)
    done = routerq(stack, "result", queued.stdout.strip(), env=queue)
    assert done.returncode == 4 and "has no result yet" in done.stderr, done.stderr


def test_a_wrong_redis_url_fails_at_once_with_one_line_naming_it(stack: Stack) -> None:
    closed = "redis://:hunter2@127.0.0.1:9/0"  # the discard port: nothing listens
    commands = (["status", "batch_x"], ["batches"], ["enqueue", "hello"], ["result", "job_x"], ["worker"])
    for command in commands:
        done = routerq(stack, *command, env={"REDIS_URL": closed}, timeout=15)  # not ~45 s of retries
        assert done.returncode == 1, (command, done.stderr)
        assert "cannot reach Redis at redis://127.0.0.1:9/0 (REDIS_URL)" in done.stderr
        assert "Traceback" not in done.stderr and "hunter2" not in done.stderr


def test_enqueue_with_phoenix_down_says_so_in_one_line_and_does_not_wait_for_it(stack: Stack) -> None:
    done = routerq(
        stack,
        "enqueue",
        "untraced for now",
        env={"PHOENIX_COLLECTOR_ENDPOINT": "http://127.0.0.1:9"},
        timeout=10,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("job_")
    said = done.stderr.strip().splitlines()
    assert len(said) == 1 and re.fullmatch(
        r"routerq: nothing listens at http://127\.0\.0\.1:9 \(PHOENIX_COLLECTOR_ENDPOINT\): \d span\(s\) not sent",
        said[0],
    ), done.stderr


def test_a_phoenix_server_installed_beside_routerq_is_never_imported(stack: Stack, tmp_path: Path) -> None:
    """`arize-phoenix` puts a `phoenix/__init__.py` that imports its whole server next to
    `arize-phoenix-otel`'s `phoenix/otel`; this stand-in does what it does (extends the namespace)
    and leaves a mark when it runs."""
    package = tmp_path / "site" / "phoenix"
    package.mkdir(parents=True)
    mark = tmp_path / "server-imported"
    (package / "__init__.py").write_text(
        '__path__ = __import__("pkgutil").extend_path(__path__, __name__)\n'
        f"open({str(mark)!r}, 'w').write('the Phoenix server was imported')\n"
    )
    done = routerq(
        stack, "enqueue", "--model", CHAT, "--wait", "traced beside a Phoenix server",
        env={"PYTHONPATH": str(tmp_path / "site")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == fake_answer(CHAT, "traced beside a Phoenix server")
    assert not mark.exists(), "routerq imported phoenix/__init__.py (the Phoenix server)"


# What only sending work or tracing needs: a command that just reads a batch must not pay for it.
# (The metrics SDK's submodules, not the package: redis-py's attempt to import it is logged, though
# it fails; see routerq/cli/__init__.py.)
NOT_FOR_READING = (
    "opentelemetry.sdk.trace", "opentelemetry.sdk.metrics.", "opentelemetry.exporter",
    "celery", "kombu", "openai", "phoenix",
)  # fmt: skip


def test_reading_a_batch_imports_no_tracing_celery_or_openai(stack: Stack, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "two.jsonl", [line(f"r{i}", "chat", f"read me {i}") for i in range(2)])
    done = routerq(stack, "submit", str(source), "--wait")
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.strip().splitlines()[-1]
    for command in (["status", batch_id], ["batches"], ["results", batch_id, "-o", str(tmp_path / "o")]):
        done = routerq(stack, *command, env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert done.returncode == 0, (command, done.stderr[-2000:])
        modules = {
            row.rsplit("|", 1)[1].strip()
            for row in done.stderr.splitlines()
            if row.startswith("import time:")
        }
        assert "redis" in modules, "the import log was not captured"
        needless = sorted(m for m in modules if m.startswith(NOT_FOR_READING))
        assert not needless, (
            f"`routerq {command[0]}` imported {len(needless)} needless modules: {needless[:8]}"
        )


# What a producer never needs: it publishes the Celery message itself (routerq.envelope), never calls
# openai, and sends spans over HTTP.
NOT_FOR_SENDING = ("celery", "kombu", "openai", "grpc", "opentelemetry.exporter.otlp.proto.grpc.exporter")


def test_enqueue_traces_without_importing_celery_openai_or_grpc(stack: Stack) -> None:
    done = routerq(stack, "enqueue", "--wait", "sent light", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == fake_answer(CHAT, "sent light")
    modules = {
        row.rsplit("|", 1)[1].strip() for row in done.stderr.splitlines() if row.startswith("import time:")
    }
    assert "phoenix.otel" in modules, "the import log was not captured, or enqueue did not trace"
    needless = sorted(m for m in modules if m.startswith(NOT_FOR_SENDING))
    assert not needless, f"`routerq enqueue` imported {len(needless)} needless modules: {needless[:8]}"


def test_tier_flex_asks_openrouter_for_its_flex_tier_on_jobs_and_batch_lines(
    stack: Stack, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex[:8]
    done = routerq(stack, "enqueue", "--tier", "flex", "--wait", f"{marker} job")
    assert done.returncode == 0, done.stderr
    rows = [line("own", "chat", f"{marker} own tier"), line("flex", "chat", f"{marker} file line")]
    rows[0]["body"]["service_tier"] = "priority"  # a line's own choice stands
    submitted = routerq(
        stack, "submit", str(write_jsonl(tmp_path / "tier.jsonl", rows)), "--tier", "flex", "--wait"
    )
    assert submitted.returncode == 0, submitted.stderr
    tiers = {
        c["prompt"].split(marker)[1].strip(): c["body"].get("service_tier") for c in calls_with(stack, marker)
    }
    assert tiers == {"job": "flex", "own tier": "priority", "file line": "flex"}


def test_a_name_with_terminal_escapes_is_printed_harmless_by_status_and_batches(stack: Stack) -> None:
    """A record stored before names were cleaned (or written by anything else) still cannot clear or
    recolour the operator's terminal."""
    hostile = "\x1b[2J\x1b[31mred\x07"
    batch = Batch(id=new_batch_id(), name=hostile, status=BatchStatus.FAILED, total=1, reason=hostile)
    BatchStore(redis.Redis.from_url(stack.redis.url), 3600).create(batch)
    for command in (["status", batch.id], ["batches", "--limit", "500"]):
        shown = routerq(stack, *command)
        assert shown.returncode == 0, shown.stderr
        assert "_[2J_[31mred_" in shown.stdout and "\x1b" not in shown.stdout + shown.stderr, command
