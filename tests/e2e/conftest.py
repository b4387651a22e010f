"""Session-wide real services: redis-server, phoenix serve, the fake OpenRouter, a prefork worker."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import httpx
import pytest
import redis

from routerq.core import telemetry
from routerq.core.batch_store import Batch
from routerq.core.settings import Settings
from routerq.devstack.localstack import (
    Service,
    free_port,
    start_fake_openrouter,
    start_phoenix,
    start_redis,
    start_worker,
)
from routerq.producer.batch_client import BatchClient
from routerq.worker.upkeep.leases import GRACE_S


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e needs the whole stack: `pytest -m "not e2e"` skips it."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)


@dataclass
class Stack:
    redis: Service
    phoenix: Service
    fake: Service
    worker: Service
    api_key: str
    env: dict[str, str]
    project: str
    tmp: Path

    @property
    def fake_base(self) -> str:
        return self.fake.url.removesuffix("/api/v1")

    def settings(self, **overrides: str) -> Settings:
        return Settings(**{**self.env, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    api_key = "sk-or-v1-" + secrets.token_hex(24)
    services: list[Service] = []
    try:
        redis_service = start_redis(free_port(), tmp / "redis")
        services.append(redis_service)
        fake = start_fake_openrouter(free_port(), tmp / "logs", keys=[api_key])
        services.append(fake)
        phoenix = start_phoenix(free_port(), free_port(), tmp / "phoenix")
        services.append(phoenix)
        project = "routerq-tests"
        env = {
            "REDIS_URL": redis_service.url,
            "OPENROUTER_API_KEY": api_key,
            "OPENROUTER_BASE_URL": fake.url,
            "OPENROUTER_HTTP_REFERER": "https://example.test/routerq",
            "OPENROUTER_TIMEOUT": "30",
            "PHOENIX_COLLECTOR_ENDPOINT": phoenix.url,
            "PHOENIX_PROJECT_NAME": project,
            "PHOENIX_DISCOVER_CONFIG": "false",
            "ROUTERQ_MAX_ATTEMPTS": "3",
            "ROUTERQ_RETRY_BASE_DELAY": "0.1",
            "ROUTERQ_RETRY_MAX_DELAY": "3",
            # Tests of a trace's shape need every trace; the budget is tested at its default, on
            # workers of its own, in test_trace_budget.
            "ROUTERQ_TRACE_BUDGET": "all",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        worker = start_worker(env, tmp / "logs", concurrency=4, loglevel="DEBUG")
        services.append(worker)
        yield Stack(redis_service, phoenix, fake, worker, api_key, env, project, tmp)
    finally:
        telemetry.flush()  # while Phoenix still listens
        for service in reversed(services):
            service.stop()
        for key, value in locals().get("saved", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True)
def forget_rates(stack: Stack) -> Iterator[None]:
    """What the shared limiter learns of a model's rate in one test (its refusals, on purpose) would
    pace that model in the next ones for minutes: each test starts with nothing learned."""
    yield
    client = redis.Redis.from_url(stack.redis.url)
    stale = list(client.scan_iter(match="routerq:limit:*"))
    if stale:
        client.delete(*stale)


ROUTERQ = str(Path(sys.executable).with_name("routerq"))


def routerq(
    stack: Stack, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> CompletedProcess[str]:
    """Run the real `routerq` command, as a user would, against the test stack."""
    return subprocess.run(
        [ROUTERQ, *args],
        env={**os.environ, **stack.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@contextmanager
def extra_worker(
    stack: Stack,
    name: str,
    concurrency: int = 2,
    processes: int | None = None,
    **env: str,
) -> Iterator[tuple[Service, Settings]]:
    """A second worker on its own queue, with some settings changed."""
    full_env = {**stack.env, "ROUTERQ_QUEUE": name, **env}
    service = start_worker(
        full_env, stack.tmp / "logs", name=name, concurrency=concurrency, processes=processes
    )
    try:
        yield service, Settings(**full_env)  # type: ignore[arg-type]
    finally:
        service.stop()


# The stack's worker retries fast for speed; these tests run a worker of their own at the defaults.
DEFAULT_RETRIES = {
    alias: str(Settings.model_fields[name].default)
    for name, alias in [
        ("max_attempts", "ROUTERQ_MAX_ATTEMPTS"),
        ("retry_base_delay", "ROUTERQ_RETRY_BASE_DELAY"),
        ("retry_max_delay", "ROUTERQ_RETRY_MAX_DELAY"),
    ]
}


# Batch helpers shared by the batch, embedding and reliability tests.
MODELS = {
    "chat": "meta-llama/llama-3.1-8b-instruct",
    "completion": "mistralai/mistral-7b-instruct",
    "embedding": "openai/text-embedding-3-small",
}


def line(custom_id: str, kind: str, text: str, model: str | None = None) -> dict[str, Any]:
    url = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "embedding": "/v1/embeddings"}[
        kind
    ]
    body: dict[str, Any] = {"model": model or MODELS[kind]}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt" if kind == "completion" else "input"] = text
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def write_jsonl(path: Path, rows: list[dict[str, Any]] | list[str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def calls_with(stack: Stack, marker: str) -> list[dict[str, Any]]:
    calls = httpx.get(f"{stack.fake_base}/_fake/calls").json()["calls"]
    return [c for c in calls if marker in (c.get("prompt") or "")]


def wait_for(check: Callable[[], object], what: str, timeout: float = 60, poll: float = 0.05) -> None:
    """Poll `check` until it is true; fail naming `what` was awaited, never hang until pytest-timeout."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(poll)


def queue_drained_behind(stack: Stack, client: BatchClient, tmp_path: Path) -> None:
    """Instead of sleeping before "nothing more was called": a one-line batch submitted now is taken
    after every message queued before it (one queue, taken in order), so once it is done the worker
    has started whatever was queued earlier."""
    marker = uuid.uuid4().hex[:8]
    source = write_jsonl(tmp_path / f"barrier-{marker}.jsonl", [line("barrier", "chat", f"{marker} barrier")])
    batch = client.submit(source).batch
    assert wait_final(client, batch.id).succeeded == 1


def wait_final(client: BatchClient, batch_id: str, timeout: float = 180) -> Batch:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.get(batch_id)
        if batch.status.final:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {client.get(batch_id)} after {timeout} s")


# The lease sweep's own view, read in one step: this queue's unacknowledged messages past the grace
# that no live lease holds. Any such message at any moment can be put back while its holder lives.
_UNLEASED = """
local old = redis.call('ZRANGEBYSCORE', 'unacked_index', '-inf', ARGV[1])
local live = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], '+inf')
local held = {}
for _, worker in ipairs(live) do
  for _, tag in ipairs(redis.call('SMEMBERS', ARGV[3] .. worker)) do held[tag] = true end
end
local found = {}
for _, tag in ipairs(old) do
  local raw = redis.call('HGET', 'unacked', tag)
  if not held[tag] and raw and string.find(raw, ARGV[4], 1, true) then found[#found + 1] = tag end
end
return found
"""


@contextmanager
def unleased_messages(stack: Stack, queue: str) -> Iterator[set[str]]:
    """Every 10 ms while the block runs, the delivery tags of `queue` the lease sweep would take for a
    dead worker's; the set is filled as they are seen."""
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    script = client.register_script(_UNLEASED)
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.01):
            now = time.time()
            args = [now - GRACE_S, int(now * 1000), f"routerq:lease:{queue}:", f'"{queue}"']
            seen.update(t.decode() for t in script(keys=[f"routerq:leases:{queue}"], args=args))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(5)
