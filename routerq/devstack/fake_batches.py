"""OpenRouter's Batch API on the local stand-in, as documented (../shared/reference/openrouter.md):

`POST /api/beta/batches` takes `{"endpoint", "model", "requests": [{"custom_id", "body"}]}` (400 when
`requests` comes before `endpoint` or `model`, when a body names another model, past 5,000 requests,
for a repeated custom_id) and answers 202 with a batch object; `GET /api/beta/batches/{id}` walks it
through validating, in_progress and finalizing to completed over `batch_s` seconds (`POST
/_fake/config {"batch_s": S}`), then holds every result inline. Each request is answered as the live
endpoint would, at half its price; `[[status:N]]` in a request makes its result an error (and its live
call, as always), `[[batch-status:N]]` its batch result only (a live call then succeeds). A request
with `[[batch-expire-first]]` makes the first batch that carries it end `expired`, and
`[[batch-failed]]` any batch `failed`; `[[batch-no-cost]]` leaves `usage.cost` out of that request's result
(the batch's `usage.cost` still counts it). Each submission is logged in `/_fake/calls` with kind "batch".
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from routerq.devstack.fake_upstream import (
    DIRECTIVE,
    PRICES,
    FakeState,
    cost_of,
    embedding_answer,
    error,
    prompt_of,
    provider_for,
    text_answer,
)

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/embeddings": "embedding"}
MAX_REQUESTS = 5_000
BATCH_PRICE = 0.5  # of the live price per token


def batch_routes(state: FakeState) -> list[Route]:
    async def create(request: Request) -> Response:
        key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not key or (state.keys and key not in state.keys):
            return error(401, "No auth credentials found" if not key else "User not found.")
        try:
            pairs = json.loads(await request.body(), object_pairs_hook=lambda p: p)
        except ValueError:
            return error(400, "Invalid JSON in request body")
        order = [k for k, _ in pairs] if isinstance(pairs, list) else []
        if "requests" in order and any(k in order[order.index("requests") :] for k in ("endpoint", "model")):
            return error(400, "endpoint and model must come before requests in the body")
        body = json.loads(json.dumps(_as_dicts(pairs)))
        problem = _invalid(body)
        if problem:
            return error(400, problem)
        batch_id = f"batch_or_{uuid.uuid4().hex[:20]}"
        now = time.time()
        prompts = [prompt_of(ENDPOINTS[body["endpoint"]], r["body"]) for r in body["requests"]]
        end = "completed"
        if any("[[batch-failed]]" in p for p in prompts):
            end = "failed"
        first_expiry = [p for p in prompts if "[[batch-expire-first]]" in p and p not in state.expired_once]
        if first_expiry:
            state.expired_once.update(first_expiry)
            end = "expired"
        state.batches[batch_id] = {**body, "id": batch_id, "created_at": now, "end": end}
        custom_ids = [r["custom_id"] for r in body["requests"]]
        state.calls.append(
            {"path": request.url.path, "kind": "batch", "t": now, "batch_id": batch_id,
             "model": body["model"], "endpoint": body["endpoint"], "custom_ids": custom_ids,
             "texts": [p[:200] for p in prompts]}
        )  # fmt: skip
        return JSONResponse(_batch_object(state.batches[batch_id], "validating", now), status_code=202)

    async def get(request: Request) -> Response:
        found = state.batches.get(request.path_params["batch_id"])
        if found is None:
            return error(404, "Batch not found")
        elapsed = (time.time() - found["created_at"]) / max(state.batch_s, 1e-6)
        status = (
            "validating" if elapsed < 0.2 else "in_progress" if elapsed < 0.8 else "finalizing" if elapsed < 1
            else found["end"]
        )  # fmt: skip
        return JSONResponse(_batch_object(found, status, time.time()))

    return [
        Route("/api/beta/batches", create, methods=["POST"]),
        Route("/api/beta/batches/{batch_id}", get),
    ]


def _as_dicts(value: Any) -> Any:
    if isinstance(value, list) and all(isinstance(i, tuple) and len(i) == 2 for i in value) and value:
        return {k: _as_dicts(v) for k, v in value}
    if isinstance(value, list):
        return [_as_dicts(v) for v in value]
    return value


def _invalid(body: Any) -> str | None:
    if not isinstance(body, dict) or body.get("endpoint") not in ENDPOINTS:
        return f"endpoint must be one of {', '.join(ENDPOINTS)}"
    model, requests = body.get("model"), body.get("requests")
    if model not in PRICES:
        return f"{model} is not a valid model ID"
    if not isinstance(requests, list) or not requests:
        return "requests must be a non-empty list"
    if len(requests) > MAX_REQUESTS:
        return f"at most {MAX_REQUESTS} requests a batch"
    ids = [r.get("custom_id") if isinstance(r, dict) else None for r in requests]
    if any(not isinstance(i, str) or not i for i in ids) or len(set(ids)) != len(ids):
        return "every request needs a custom_id, unique in the batch"
    if any(not isinstance(r.get("body"), dict) or r["body"].get("model", model) != model for r in requests):
        return "a request's body names a model other than the batch's"
    return None


def _result(batch: dict[str, Any], request: dict[str, Any], n: int) -> tuple[dict[str, Any], float]:
    """A request's result, and what it costs (its `usage.cost`, unless `[[batch-no-cost]]` hides it)."""
    kind, model = ENDPOINTS[batch["endpoint"]], batch["model"]
    prompt = prompt_of(kind, request["body"])
    directives = {m.group(1): m.group(2) for m in DIRECTIVE.finditer(prompt)}
    base = {"id": f"batch_req_{n}", "custom_id": request["custom_id"]}
    failing = directives.get("batch-status") or directives.get("status")
    if "status" in directives or "batch-status" in directives:
        status = int(failing or 500)
        error = {"code": status, "message": f"fake upstream error {status}"}
        return {**base, "response": None, "error": error}, 0.0
    answer = (
        embedding_answer(model, request["body"])
        if kind == "embedding"
        else text_answer(kind, model, prompt, directives)
    )
    usage = answer["usage"]
    usage["cost"] = BATCH_PRICE * cost_of(model, usage["prompt_tokens"], usage.get("completion_tokens", 0))
    generation = f"gen-batch-{batch['id'][-8:]}-{n:06d}"
    answer.update(
        {
            "id": generation,
            "model": model,
            "provider": provider_for(model),
            "created": int(batch["created_at"]),
        }
    )
    cost = float(usage["cost"])
    if "batch-no-cost" in directives:  # the batch's usage still counts it; the result does not say
        answer["usage"] = {k: v for k, v in usage.items() if k != "cost"}
    return {
        **base,
        "response": {"status_code": 200, "request_id": generation, "body": answer},
        "error": None,
    }, cost


def _batch_object(batch: dict[str, Any], status: str, now: float) -> dict[str, Any]:
    requests = batch["requests"]
    done = status == "completed"
    priced = [_result(batch, r, n) for n, r in enumerate(requests)] if done else None
    results = [result for result, _ in priced] if priced is not None else None
    usage = None
    if results is not None and priced is not None:
        usages = [r["response"]["body"]["usage"] for r in results if r["response"]]
        usage = {
            "prompt_tokens": sum(u["prompt_tokens"] for u in usages),
            "completion_tokens": sum(u.get("completion_tokens", 0) for u in usages),
            "total_tokens": sum(u["total_tokens"] for u in usages),
            "cost": sum(cost for _, cost in priced),
            "is_byok": False,
        }
    failed = sum(1 for r in results or [] if r["error"])
    return {
        "id": batch["id"],
        "object": "batch",
        "endpoint": batch["endpoint"],
        "model": batch["model"],
        "completion_window": "24h",
        "status": status,
        "created_at": int(batch["created_at"]),
        "finalized_at": int(now) if status in ("completed", "failed", "expired") else None,
        "request_counts": {
            "total": len(requests),
            "completed": len(requests) - failed if done else 0,
            "failed": failed,
        },
        "usage": usage,
        "results": results,
        "error": {"message": f"fake batch {status}"} if status in ("failed", "expired") else None,
    }
