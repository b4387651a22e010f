"""Each outcome of routerq's task bodies (run_job, run_lines, run_embed), run in-process on a real Runtime
over a real redis-server, the upstream answered from a table. What is asserted is what landed in Redis
and how many calls went upstream."""

from __future__ import annotations

import base64
import json
import struct
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
from harness import Answer, TableUpstream, chat_answer, error_answer, run, settings_for

from routerq.core.batch_format import BatchLine
from routerq.core.batch_store import Batch, BatchStatus, BatchStore, batch_key
from routerq.core.broker import EMBED_TASK_NAME, LINE_TASK_NAME, TASK_NAME
from routerq.core.embed_store import EmbedRun, EmbedStore, embed_key
from routerq.core.job_chain import JobGo
from routerq.core.jobs import Job, JobKind
from routerq.core.result_store import RESULT_KEY
from routerq.worker.execution.app import create_app
from routerq.worker.execution.pool import DRAINING, Delivery
from routerq.worker.execution.runtime import Runtime, build_runtime
from routerq.worker.execution.tasks import run_embed, run_job, run_lines

T = TypeVar("T")
MODEL = "meta-llama/llama-3.1-8b-instruct"


def on_runtime(
    redis_url: str,
    table: dict[str, list[Answer]],
    body: Callable[[Runtime, TableUpstream], Awaitable[T]],
    **overrides: str,
) -> tuple[T, TableUpstream]:
    settings = settings_for(redis_url, **overrides)
    upstream = TableUpstream(table)

    async def main() -> T:
        rt = build_runtime(create_app(settings), settings, 4, upstream)
        try:
            return await body(rt, upstream)
        finally:
            await rt.redis.aclose()

    return run(main), upstream


def delivery(rt: Runtime, task: str, retries: int = 0, task_id: str | None = None) -> Delivery:
    return Delivery(rt.app, task, task_id or uuid.uuid4().hex, retries)


def chat_job(marker: str) -> Job:
    return Job(kind=JobKind.CHAT, body={"model": MODEL, "messages": [{"role": "user", "content": marker}]})


def stored(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    raw = client.get(RESULT_KEY.format(job_id=job_id))
    return json.loads(raw) if raw else None


def queued(client: redis.Redis, queue: str = "routerq") -> list[dict[str, Any]]:
    return [json.loads(m) for m in client.lrange(queue, 0, -1)]


# --- run_job ---


def test_a_job_that_succeeds_stores_its_answer_and_cost_after_one_call(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    job = chat_job("hello")
    out, upstream = on_runtime(
        redis_url, {"hello": [chat_answer("hi there", cost=0.002)]},
        lambda rt, _: run_job(rt, delivery(rt, TASK_NAME), job.model_dump(mode="json")),
    )  # fmt: skip
    assert out["status"] == "succeeded"
    result = stored(sync_redis, job.id)
    assert result is not None and result["usage"]["cost"] == 0.002
    assert result["response"]["choices"][0]["message"]["content"] == "hi there"
    assert upstream.calls_for("hello") == 1


def test_a_job_refused_for_good_fails_with_openrouters_message_after_one_call(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    job = chat_job("bad request")
    out, upstream = on_runtime(
        redis_url, {"bad request": [error_answer(400, "model is not a valid model ID")]},
        lambda rt, _: run_job(rt, delivery(rt, TASK_NAME), job.model_dump(mode="json")),
    )  # fmt: skip
    result = stored(sync_redis, job.id)
    assert out["status"] == "failed" and result is not None
    assert (result["error"]["status_code"], result["error"]["message"]) == (
        400,
        "model is not a valid model ID",
    )
    assert upstream.calls_for("bad request") == 1


def test_a_rate_limited_job_is_republished_with_the_retry_after_as_its_countdown(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    job = chat_job("limited")
    out, upstream = on_runtime(
        redis_url, {"limited": [error_answer(429, "slow down", retry_after="7")]},
        lambda rt, _: run_job(rt, delivery(rt, TASK_NAME, task_id=job.id), job.model_dump(mode="json")),
    )  # fmt: skip
    assert out["status"] == "retrying"
    assert stored(sync_redis, job.id) is None  # not final: no result yet
    (message,) = queued(sync_redis)
    headers = message["headers"]
    assert (headers["task"], headers["id"], headers["retries"]) == (TASK_NAME, job.id, 1)
    assert headers["eta"] is not None  # run no earlier than the Retry-After
    assert upstream.calls_for("limited") == 1


def test_a_job_that_already_succeeded_is_not_called_again(redis_url: str, sync_redis: redis.Redis) -> None:
    job = chat_job("twice")

    async def twice(rt: Runtime, _: TableUpstream) -> str:
        await run_job(rt, delivery(rt, TASK_NAME), job.model_dump(mode="json"))
        again = await run_job(rt, delivery(rt, TASK_NAME), job.model_dump(mode="json"))
        return str(again["status"])

    status, upstream = on_runtime(redis_url, {"twice": [chat_answer()]}, twice)
    assert status == "succeeded" and upstream.calls_for("twice") == 1


def test_a_message_delivered_past_max_deliveries_fails_without_a_call(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    job = chat_job("poison")

    async def redelivered(rt: Runtime, _: TableUpstream) -> None:
        message = delivery(rt, TASK_NAME, task_id=job.id)
        sync_redis.set(f"routerq:deliveries:{job.id}:{message.id}:0", rt.settings.max_deliveries)
        await run_job(rt, message, job.model_dump(mode="json"))

    _, upstream = on_runtime(redis_url, {"poison": [chat_answer()]}, redelivered)
    result = stored(sync_redis, job.id)
    assert result is not None and result["error"]["code"] == "worker_lost"
    assert upstream.calls_for("poison") == 0


# --- run_lines ---


def make_batch(client: redis.Redis, texts: list[str], status: BatchStatus = BatchStatus.IN_PROGRESS) -> str:
    batch = Batch(id=f"batch_{uuid.uuid4().hex[:8]}", status=status, total=len(texts))
    BatchStore(client, 3600).create(batch)
    lines = {
        str(i): BatchLine(
            i + 1, f"c-{i}", JobKind.CHAT, {"model": MODEL, "messages": [{"role": "user", "content": t}]}
        ).stored()
        for i, t in enumerate(texts)
    }
    client.hset(batch_key(batch.id, "in"), mapping=lines)
    return batch.id


def outcomes(client: redis.Redis, batch_id: str) -> dict[int, tuple[str, dict[str, Any]]]:
    raw = client.hgetall(batch_key(batch_id, "out"))
    return {int(k): (v[:1].decode(), json.loads(v[1:])) for k, v in raw.items()}


def test_lines_of_one_message_each_get_their_outcome_and_end_the_batch(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, ["line ok", "line refused"])
    table = {"line ok": [chat_answer("fine")], "line refused": [error_answer(400, "no such model")]}
    on_runtime(
        redis_url, table, lambda rt, _: run_lines(rt, delivery(rt, LINE_TASK_NAME), batch_id, [0, 1], 1.0)
    )
    got = outcomes(sync_redis, batch_id)
    assert got[0][0] == "S" and got[0][1]["custom_id"] == "c-0"
    assert got[1][0] == "F" and got[1][1]["error"]["message"] == "no such model"
    batch = BatchStore(sync_redis, 3600).get(batch_id)
    assert batch is not None and (batch.status, batch.succeeded, batch.failed) == (
        BatchStatus.COMPLETED,
        1,
        1,
    )


def test_a_retried_line_goes_back_to_the_consumers_end_of_the_queue_and_keeps_no_outcome(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, ["line busy"])
    on_runtime(
        redis_url, {"line busy": [error_answer(502, "provider down")]},
        lambda rt, _: run_lines(rt, delivery(rt, LINE_TASK_NAME), batch_id, [0], 1.0),
    )  # fmt: skip
    assert outcomes(sync_redis, batch_id) == {}
    (message,) = queued(sync_redis)
    assert message["headers"]["task"] == LINE_TASK_NAME and message["headers"]["retries"] == 1
    assert sync_redis.scard(batch_key(batch_id, "run")) == 0  # not running while it waits


def test_lines_of_a_cancelled_batch_are_cancelled_without_a_call(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, ["line late"], status=BatchStatus.CANCELLING)
    _, upstream = on_runtime(
        redis_url, {"line late": [chat_answer()]},
        lambda rt, _: run_lines(rt, delivery(rt, LINE_TASK_NAME), batch_id, [0], 1.0),
    )  # fmt: skip
    outcome, line = outcomes(sync_redis, batch_id)[0]
    assert outcome == "C" and upstream.calls_for("line late") == 0
    # one error shape for every error line (OpenAI's), never an "id": null or extra keys
    assert set(line) == {"id", "custom_id", "response", "error"} and line["id"].startswith("batch_req_")
    assert line["error"] == {
        "code": "batch_cancelled",
        "message": "batch is cancelling; line not sent upstream",
    }
    batch = BatchStore(sync_redis, 3600).get(batch_id)
    assert batch is not None and batch.status is BatchStatus.CANCELLED
    assert (batch.cancelled, batch.traced, batch.sampled_out) == (1, 0, 0)  # not counted as a sampled success


def test_a_line_that_already_succeeded_is_not_sent_again(redis_url: str, sync_redis: redis.Redis) -> None:
    batch_id = make_batch(sync_redis, ["line once"])

    async def twice(rt: Runtime, _: TableUpstream) -> None:
        await run_lines(rt, delivery(rt, LINE_TASK_NAME), batch_id, [0], 1.0)
        await run_lines(rt, delivery(rt, LINE_TASK_NAME), batch_id, [0], 1.0)  # a redelivery

    _, upstream = on_runtime(redis_url, {"line once": [chat_answer()]}, twice)
    assert upstream.calls_for("line once") == 1


def test_lines_of_an_expired_batch_are_dropped_without_a_call(redis_url: str) -> None:
    _, upstream = on_runtime(
        redis_url, {"": [chat_answer()]},
        lambda rt, _: run_lines(rt, delivery(rt, LINE_TASK_NAME), "batch_gone", [0, 1], 1.0),
    )  # fmt: skip
    assert upstream.requests == []


# --- run_embed ---


def vector_answer(count: int) -> Answer:
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(struct.pack("<2f", i, 1.0)).decode(),
        }
        for i in range(count)
    ]
    usage = {"prompt_tokens": 4 * count, "total_tokens": 4 * count, "cost": 0.0001}
    return Answer(
        200, {"object": "list", "model": "openai/text-embedding-3-small", "data": data, "usage": usage}
    )


def make_run(client: redis.Redis, texts: list[str]) -> str:
    run_id = f"emb_{uuid.uuid4().hex[:8]}"
    EmbedStore(client, 3600).save(
        EmbedRun(id=run_id, model="openai/text-embedding-3-small", total=len(texts))
    )
    client.hset(
        embed_key(run_id, "in"), mapping={str(i): json.dumps({"text": t}) for i, t in enumerate(texts)}
    )
    return run_id


def test_an_embedding_request_stores_one_raw_vector_per_text(redis_url: str, sync_redis: redis.Redis) -> None:
    run_id = make_run(sync_redis, ["alpha text", "beta text"])
    out, upstream = on_runtime(
        redis_url, {"alpha text": [vector_answer(2)]},
        lambda rt, _: run_embed(rt, delivery(rt, EMBED_TASK_NAME), run_id, [0, 1], 1.0),
    )  # fmt: skip
    assert out["stored"] == 2
    assert sync_redis.hget(embed_key(run_id, "vec"), "1") == struct.pack("<2f", 1, 1.0)
    assert upstream.calls_for("alpha text") == 1


def test_a_failed_embedding_request_counts_its_texts_failed_and_lets_them_go(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    run_id = make_run(sync_redis, ["gamma text"])
    on_runtime(
        redis_url, {"gamma text": [error_answer(400, "input too long")]},
        lambda rt, _: run_embed(rt, delivery(rt, EMBED_TASK_NAME), run_id, [0], 1.0),
    )  # fmt: skip
    assert sync_redis.hget(embed_key(run_id), "failed") == b"1"
    assert not sync_redis.hexists(embed_key(run_id, "claim"), "0")


def test_lines_a_warm_shutdown_stops_before_their_calls_go_back_to_the_front_of_the_queue(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    batch_id = make_batch(sync_redis, ["line stopped", "line waiting"])
    sync_redis.lpush("routerq", "a message of the backlog")  # producers LPUSH; consumers take the right end
    DRAINING.set()
    try:
        _, upstream = on_runtime(
            redis_url, {"line": [chat_answer()]},
            lambda rt, _: run_lines(rt, delivery(rt, LINE_TASK_NAME), batch_id, [0, 1], 1.0),
        )  # fmt: skip
    finally:
        DRAINING.clear()
    assert upstream.requests == []
    taken_next = json.loads(sync_redis.lindex("routerq", -1) or b"{}")
    assert json.loads(base64.b64decode(taken_next["body"]))[0] == [batch_id, [0, 1], 1.0]


def test_a_retried_line_is_taken_before_the_backlog(redis_url: str, sync_redis: redis.Redis) -> None:
    batch_id = make_batch(sync_redis, ["line again"])
    sync_redis.lpush("routerq", "a message of the backlog")
    on_runtime(
        redis_url, {"line again": [error_answer(503, "try later")]},
        lambda rt, _: run_lines(rt, delivery(rt, LINE_TASK_NAME), batch_id, [0], 1.0),
    )  # fmt: skip
    taken_next = json.loads(sync_redis.lindex("routerq", -1) or b"{}")
    assert taken_next["headers"]["retries"] == 1 and taken_next["headers"]["eta"] is not None


# --- one live message and one call at a time per job (routerq/core/lua/job_go.lua) ---


def message_kwargs(message: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(base64.b64decode(message["body"]))[1])


def test_a_job_reported_failed_is_never_called_again(redis_url: str, sync_redis: redis.Redis) -> None:
    job = chat_job("failed once")

    async def twice(rt: Runtime, _: TableUpstream) -> str:
        await run_job(rt, delivery(rt, TASK_NAME), job.model_dump(mode="json"))  # a 400: failed for good
        again = await run_job(rt, delivery(rt, TASK_NAME), job.model_dump(mode="json"))  # a copy
        return str(again["status"])

    status, upstream = on_runtime(
        redis_url, {"failed once": [error_answer(400, "bad"), chat_answer()]}, twice
    )
    assert status == "failed" and upstream.calls_for("failed once") == 1


def test_a_stale_copy_of_a_retried_jobs_message_ends_without_a_call(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    job = chat_job("copied")

    async def retry_then_copy(rt: Runtime, _: TableUpstream) -> str:
        await run_job(rt, delivery(rt, TASK_NAME, task_id=job.id), job.model_dump(mode="json"))  # 429: retry
        # the first message again (put back while its holder lived): the job has moved on
        copy = await run_job(rt, delivery(rt, TASK_NAME, task_id=job.id), job.model_dump(mode="json"))
        return str(copy["status"])

    status, upstream = on_runtime(
        redis_url, {"copied": [error_answer(429, "slow down", retry_after="30")]}, retry_then_copy
    )
    assert status == "stale_copy"
    assert upstream.calls_for("copied") == 1
    (retry,) = queued(sync_redis)  # only the retry's message: the copy re-published nothing
    assert message_kwargs(retry)["gen"]


def test_the_retry_message_run_before_its_countdown_waits_instead_of_calling(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    job = chat_job("too early")

    async def early(rt: Runtime, _: TableUpstream) -> str:
        await run_job(rt, delivery(rt, TASK_NAME, task_id=job.id), job.model_dump(mode="json"))
        (retry,) = queued(sync_redis)
        sync_redis.delete("routerq")
        kwargs = message_kwargs(retry)
        out = await run_job(
            rt,
            delivery(rt, TASK_NAME, 1, job.id),
            job.model_dump(mode="json"),
            kwargs["tries"],
            kwargs["gen"],
        )
        return str(out["status"])

    status, upstream = on_runtime(
        redis_url, {"too early": [error_answer(429, "wait", retry_after="30")]}, early
    )
    assert status == "retrying"
    assert upstream.calls_for("too early") == 1  # Retry-After 30 s: the second call did not happen
    assert sync_redis.hget(f"routerq:job:{job.id}:chain", "note") == b"wait; next try in 30 s"  # still why


def test_a_copy_arriving_while_another_run_calls_waits_for_it(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    job = chat_job("in flight")

    async def while_held(rt: Runtime, _: TableUpstream) -> str:
        verdict, _ = await rt.chains.go(job.id, "", "another-run", 60, "routerq:deliveries:other")
        assert verdict is JobGo.GO  # another run of the message calls
        out = await run_job(rt, delivery(rt, TASK_NAME, task_id=job.id), job.model_dump(mode="json"))
        return str(out["status"])

    status, upstream = on_runtime(redis_url, {"in flight": [chat_answer()]}, while_held)
    assert status == "retrying" and upstream.calls_for("in flight") == 0
    (later,) = queued(sync_redis)
    assert later["headers"]["eta"] is not None


def test_a_copy_that_waits_or_ends_counts_no_delivery_so_it_never_makes_a_job_poisoned(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    """A copy of a waiting job's message (put back while its holder lived) ran and counted a
    delivery each time: three such copies failed a healthy job as worker_lost."""
    job = chat_job("copies")

    async def copies(rt: Runtime, _: TableUpstream) -> list[str]:
        message = delivery(rt, TASK_NAME, task_id=job.id)
        await run_job(rt, message, job.model_dump(mode="json"))  # a 429: the job waits 30 s
        statuses = []
        for _ in range(4):  # the first message again and again: a stale copy each time
            statuses.append(str((await run_job(rt, message, job.model_dump(mode="json")))["status"]))
        return statuses

    statuses, upstream = on_runtime(
        redis_url, {"copies": [error_answer(429, "wait", retry_after="30")]}, copies
    )
    assert statuses == ["stale_copy"] * 4
    assert upstream.calls_for("copies") == 1 and sync_redis.get(f"routerq:result:{job.id}") is None
    assert sync_redis.get(f"routerq:deliveries:{job.id}:{job.id}:0") == b"1"  # the one call
