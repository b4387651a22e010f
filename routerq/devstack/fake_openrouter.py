"""A local stand-in for OpenRouter: its response shapes, its errors, and its quirks, on loopback.

Used by the tests and by `make demo` when no OPENROUTER_API_KEY is set. Answers are deterministic
(`fake_answer`, `fake_embedding`) so tests can compute what a real call would have returned.
Directives inside a prompt trigger faults for that request:
  [[status:429]] (with [[retry-after:2]]), [[200-error]], [[empty]], [[broken]], [[slow:1.5]],
  [[flaky:N]] or [[flaky:N:STATUS]] (the first N calls with this exact prompt answer 500, or STATUS,
  with [[retry-after:S]] if given;
  later ones succeed).
`POST /_fake/config` sets latency, accepted keys and fault rules: each rule applies to prompts containing
its `match` and, deterministically per prompt and attempt, answers 429 (with Retry-After), 502 or
200-with-error at the given rates, or hangs the first `hang_first` calls of a prompt for `hang_s`.
`rate_limits` ({model: n}) admits n requests of that model per rolling second and answers 429
(Retry-After: 1, a provider's 429: `metadata.provider_name`) beyond; `in_flight_budget` answers 402
`in_flight_budget_exhausted` (Retry-After: 1) past that many calls at once; `queue_latency` ({model: s})
makes a limited model's calls up to s seconds slower as its rolling second fills (a provider's queue).
`GET /_fake/calls` and `POST /_fake/reset` expose the call log. OpenRouter's Batch API is served too
(routerq.devstack.fake_batches).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from routerq.devstack.fake_batches import batch_routes
from routerq.devstack.fake_upstream import (
    DIRECTIVE,
    PRICES,
    FakeState,
    cost_of,
    embedding_answer,
    error,
    fake_answer,
    fake_embedding,
    prompt_of,
    provider_for,
    rule_fault,
    text_answer,
)

__all__ = ["create_app", "fake_answer", "fake_embedding", "main"]  # tests compute answers from here


def create_app(state: FakeState) -> Starlette:
    async def handle(request: Request, kind: str) -> Response:
        started = time.time()
        call: dict[str, Any] = {"path": request.url.path, "kind": kind, "t": started}
        state.calls.append(call)
        response: Response
        if state.in_flight_budget and state.in_flight >= state.in_flight_budget:
            response = error(
                402, "Too many requests in flight for this key's balance", {"Retry-After": "1"},
                limit_source="openrouter_in_flight_budget", reason="in_flight_budget_exhausted",
            )  # fmt: skip
        else:
            state.in_flight += 1
            try:
                response = await _answer(request, kind, call)
            finally:
                state.in_flight -= 1
        call["status"] = response.status_code
        call["t_end"] = time.time()
        return response

    async def _answer(request: Request, kind: str, call: dict[str, Any]) -> Response:
        call["title"] = request.headers.get("x-openrouter-title") or request.headers.get("x-title")
        call["referer"] = request.headers.get("http-referer")
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error(400, "Invalid JSON in request body")
        model = body.get("model") or (body.get("models") or [None])[0]
        call["model"] = model
        if kind != "embedding":  # what the worker sent, for tests of pass-through (inputs can be large)
            call["body"] = body
        prompt = prompt_of(kind, body)
        call["prompt"] = prompt[:200]
        if kind == "embedding":
            texts = body.get("input") if isinstance(body.get("input"), list) else [body.get("input")]
            call["inputs"] = len(texts)
            call["texts"] = texts  # which texts were sent (and paid for), for tests of re-sending
        key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not key or (state.keys and key not in state.keys):
            return error(401, "No auth credentials found" if not key else "User not found.")
        directives = {m.group(1): m.group(2) for m in DIRECTIVE.finditer(prompt)}
        state.seen[prompt] = attempt = state.seen.get(prompt, 0) + 1
        call["attempt"] = attempt
        if model in PRICES and state.over_rate(model, time.time()):  # refused on arrival, as a gateway does
            return error(429, f"{model} is temporarily rate-limited upstream", {"Retry-After": "1"},
                         provider_name=provider_for(model), raw="rate limit exceeded")  # fmt: skip
        rule = next((r for r in state.rules if r.get("match") and r["match"] in prompt), None)
        if rule is not None and attempt <= int(rule.get("hang_first", 0)):
            await asyncio.sleep(float(rule.get("hang_s", 60)))
        delay = state.latency_ms / 1000 * (1 + random.uniform(-state.jitter, state.jitter))
        delay += float(directives.get("slow") or 0) + state.queue_delay(model)
        if delay > 0:
            await asyncio.sleep(delay)
        if model not in PRICES:
            return error(400, f"{model} is not a valid model ID")
        if rule is not None and (fault := rule_fault(rule, prompt, attempt)) is not None:
            return fault
        headers = {"Retry-After": directives["retry-after"]} if "retry-after" in directives else None
        if "flaky" in directives:
            times, _, status = (directives["flaky"] or "1").partition(":")
            if attempt <= int(times):
                return error(int(status or 500), "fake flaky upstream error", headers)
        if "status" in directives:
            status = int(directives["status"] or 500)
            if status == 403:
                return error(status, "Input flagged by moderation", headers, reasons=["harassment"])
            return error(status, f"fake upstream error {status}", headers)
        if "broken" in directives:
            return Response('{"id": "gen-broken", "choi', media_type="application/json")
        generation = f"gen-{int(time.time())}-{next(state.ids):08d}"
        if "200-error" in directives:
            crashed = {"code": 502, "message": "Upstream provider crashed mid-generation"}
            return JSONResponse({"id": generation, "error": crashed, "choices": []})
        upstream = provider_for(model)
        if kind == "embedding":
            answer = embedding_answer(model, body)
        else:
            answer = text_answer(kind, model, prompt, directives)
        usage = answer["usage"]
        usage["cost"] = cost_of(model, usage["prompt_tokens"], usage.get("completion_tokens", 0))
        usage["is_byok"] = False
        answer.update({"id": generation, "model": model, "provider": upstream, "created": int(time.time())})
        state.generations[generation] = {
            "id": generation,
            "total_cost": usage["cost"],
            "provider_name": upstream,
            "model": model,
        }
        call["ok"] = "empty" not in directives  # a real, billable answer
        return JSONResponse(answer, headers={"X-Generation-Id": generation})

    async def models(_: Request) -> Response:
        data = [
            {"id": slug, "name": slug, "context_length": 131072, "pricing": {"prompt": p, "completion": c}}
            for slug, (p, c) in PRICES.items()
        ]
        return JSONResponse({"data": data})

    async def generation(request: Request) -> Response:
        found = state.generations.get(request.query_params.get("id", ""))
        return JSONResponse({"data": found}) if found else error(404, "Generation not found")

    async def key_info(request: Request) -> Response:
        key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not key or (state.keys and key not in state.keys):
            return error(401, "No auth credentials found" if not key else "User not found.")
        data = {
            "label": "sk-or-v1-...",
            "limit": None,
            "limit_remaining": None,
            "usage": 0,
            "is_free_tier": False,
        }
        return JSONResponse({"data": data})

    async def calls(_: Request) -> Response:
        return JSONResponse({"total": len(state.calls), "calls": state.calls})

    async def reset(_: Request) -> Response:
        state.calls.clear()
        return JSONResponse({"ok": True})

    async def configure(request: Request) -> Response:
        config = await request.json()
        state.latency_ms = float(config.get("latency_ms", state.latency_ms))
        state.jitter = float(config.get("jitter", state.jitter))
        if "keys" in config:
            state.keys = set(config["keys"])
        if "rules" in config:
            state.rules = list(config["rules"])
        state.batch_s = float(config.get("batch_s", state.batch_s))
        if "rate_limits" in config:  # {"model": requests per rolling second}; a change applies at once
            state.rate_limits = {str(k): float(v) for k, v in config["rate_limits"].items()}
        if "queue_latency" in config:  # {"model": seconds more at its limit}
            state.queue_latency = {str(k): float(v) for k, v in config["queue_latency"].items()}
        state.in_flight_budget = int(config.get("in_flight_budget", state.in_flight_budget))
        return JSONResponse({"latency_ms": state.latency_ms, "jitter": state.jitter, "rules": state.rules})

    async def health(_: Request) -> Response:
        return JSONResponse({"ok": True})

    def endpoint(kind: str) -> Any:
        async def route(request: Request) -> Response:
            return await handle(request, kind)

        return route

    return Starlette(
        routes=[
            Route("/api/v1/chat/completions", endpoint("chat"), methods=["POST"]),
            Route("/api/v1/completions", endpoint("completion"), methods=["POST"]),
            Route("/api/v1/embeddings", endpoint("embedding"), methods=["POST"]),
            Route("/api/v1/models", models),
            Route("/api/v1/generation", generation),
            Route("/api/v1/key", key_info),
            *batch_routes(state),
            Route("/_fake/calls", calls),
            Route("/_fake/reset", reset, methods=["POST"]),
            Route("/_fake/config", configure, methods=["POST"]),
            Route("/healthz", health),
        ]
    )


def serve(host: str, port: int, keys: set[str], latency_ms: float = 0.0, jitter: float = 0.0) -> None:
    import uvicorn

    state = FakeState(keys=keys, latency_ms=latency_ms, jitter=jitter)
    uvicorn.run(create_app(state), host=host, port=port, log_level="warning", access_log=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--key", action="append", default=[], help="accepted API key (default: any)")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--jitter", type=float, default=0.0)
    args = parser.parse_args()
    serve(args.host, args.port, set(args.key), args.latency_ms, args.jitter)


if __name__ == "__main__":
    main()
