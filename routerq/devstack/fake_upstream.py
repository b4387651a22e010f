"""What the local OpenRouter stand-in answers, shared by its live endpoints (fake_openrouter) and its
Batch API (fake_batches): prices, deterministic answers and embeddings, errors, and its state."""

from __future__ import annotations

import array
import base64
import collections
import hashlib
import itertools
import json
import random
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse, Response

PRICES: dict[str, tuple[str, str]] = {
    "meta-llama/llama-3.1-8b-instruct": ("0.00000002", "0.00000005"),
    "mistralai/mistral-7b-instruct": ("0.000000028", "0.000000054"),
    "openai/gpt-4o-mini": ("0.00000015", "0.0000006"),
    "deepseek/deepseek-chat-v3.1": ("0.0000002", "0.0000008"),
    "openai/text-embedding-3-small": ("0.00000002", "0"),
    "meta-llama/llama-3.3-70b-instruct:free": ("0", "0"),
}
EMBEDDING_DIMS = {"openai/text-embedding-3-small": 1536}
UPSTREAMS = ("DeepInfra", "Together", "Lambda", "Novita")
DIRECTIVE = re.compile(r"\[\[([a-z0-9-]+)(?::([^\]]+))?\]\]")


def fake_answer(model: str, prompt: str) -> str:
    """What the fake says to a prompt: short, deterministic, and visibly fake."""
    words = DIRECTIVE.sub("", prompt).split()
    digest = hashlib.sha256(f"{model}\n{prompt}".encode()).hexdigest()[:8]
    return f"({model}) heard {len(words)} words, ending with {' '.join(words[-3:])!r} #{digest}"


def fake_embedding(text: str, dims: int) -> list[float]:
    """A unit vector derived from the text, already rounded to float32 as OpenAI's wire format is."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    raw = [rng.uniform(-1.0, 1.0) for _ in range(dims)]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return list(array.array("f", (x / norm for x in raw)))


def count_tokens(text: str) -> int:
    return max(1, len(text.split()))


def provider_for(model: str) -> str:
    return UPSTREAMS[int(hashlib.md5(model.encode()).hexdigest(), 16) % len(UPSTREAMS)]


def cost_of(model: str, prompt_tokens: int, completion_tokens: int) -> float:
    prompt, completion = PRICES[model]
    return prompt_tokens * float(prompt) + completion_tokens * float(completion)


def text_answer(kind: str, model: str, prompt: str, directives: dict[str, str | None]) -> dict[str, Any]:
    text = fake_answer(model, prompt)
    prompt_tokens, completion_tokens = count_tokens(prompt), count_tokens(text)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if kind == "chat":
        message = {"role": "assistant", "content": "" if "empty" in directives else text}
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
        return {
            "object": "chat.completion",
            "choices": [] if "empty" in directives else [choice],
            "usage": usage,
        }
    choices = [] if "empty" in directives else [{"index": 0, "text": text, "finish_reason": "stop"}]
    return {"object": "text_completion", "choices": choices, "usage": usage}


def embedding_answer(model: str, body: dict[str, Any]) -> dict[str, Any]:
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    dims = int(body.get("dimensions") or EMBEDDING_DIMS.get(model, 256))
    data = []
    for index, text in enumerate(inputs):
        vector = fake_embedding(str(text), dims)
        encoded: Any = vector
        if body.get("encoding_format") == "base64":
            encoded = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(count_tokens(str(t)) for t in inputs)
    return {"object": "list", "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


@dataclass
class FakeState:
    keys: set[str]
    latency_ms: float = 0.0
    jitter: float = 0.0
    calls: list[dict[str, Any]] = field(default_factory=list)
    ids: itertools.count[int] = field(default_factory=itertools.count)
    generations: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    rules: list[dict[str, Any]] = field(default_factory=list)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)  # fake_batches: upstream batches
    batch_s: float = 1.0  # how long an upstream batch takes from submission to completed
    expired_once: set[str] = field(default_factory=set)  # prompts whose first batch has expired
    # a hidden provider limit per model: requests admitted per rolling second (429 beyond)
    rate_limits: dict[str, float] = field(default_factory=dict)
    admitted: dict[str, collections.deque[float]] = field(default_factory=dict)
    # a provider's queue: a limited model's calls take up to this many seconds more as its rolling
    # second fills (none up to half its limit, all of it at the limit), the warning before its 429s
    queue_latency: dict[str, float] = field(default_factory=dict)
    in_flight_budget: int = 0  # OpenRouter's in-flight spending budget: 402 past this many calls at once
    in_flight: int = 0

    def over_rate(self, model: str, now: float) -> bool:
        """Whether the model's hidden limit refuses a request arriving now (admitted ones count)."""
        limit = self.rate_limits.get(model)
        if limit is None:
            return False
        admitted = self.admitted.setdefault(model, collections.deque())
        while admitted and admitted[0] <= now - 1.0:
            admitted.popleft()
        if len(admitted) >= limit:
            return True
        admitted.append(now)
        return False

    def queue_delay(self, model: str) -> float:
        """The extra seconds an admitted call of `model` waits in its provider's queue."""
        limit, most = self.rate_limits.get(model), self.queue_latency.get(model, 0.0)
        if not limit or not most:
            return 0.0
        fill = len(self.admitted.get(model, ())) / limit
        return most * max(0.0, 2 * fill - 1)


def roll(seed: str, prompt: str, attempt: int) -> float:
    """A uniform number fixed by prompt and attempt: faults do not depend on call order."""
    digest = hashlib.sha256(f"{seed}\n{prompt}\n{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def rule_fault(rule: dict[str, Any], prompt: str, attempt: int) -> Response | None:
    rolled = roll(str(rule.get("seed", "")), prompt, attempt)
    edge = float(rule.get("rate_429", 0))
    if rolled < edge:
        retry_after = str(rule.get("retry_after", 1))
        return error(429, "Rate limit exceeded: fake", {"Retry-After": retry_after}, provider_code=429)
    edge += float(rule.get("rate_502", 0))
    if rolled < edge:
        return error(502, "fake provider returned an invalid response")
    edge += float(rule.get("rate_200_error", 0))
    if rolled < edge:
        return JSONResponse({"id": "gen-fault", "error": {"code": 502, "message": "fake error after start"}})
    return None


def error(status: int, message: str, headers: dict[str, str] | None = None, **metadata: Any) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": status, "message": message}}
    if metadata:
        body["error"]["metadata"] = metadata
    return JSONResponse(body, status_code=status, headers=headers)


def prompt_of(kind: str, body: dict[str, Any]) -> str:
    if kind == "chat":
        parts = []
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            parts.append(content if isinstance(content, str) else json.dumps(content))
        return "\n".join(parts)
    value = body.get("prompt" if kind == "completion" else "input")
    return value if isinstance(value, str) else json.dumps(value)
