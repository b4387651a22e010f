"""Which lines OpenRouter's Batch API takes, and how they are grouped into upstream batches."""

from __future__ import annotations

from typing import Any

from routerq.core.jobs import JobKind
from routerq.core.upstream_batch import Chunker, refusal


def chat(model: str = "m", content: Any = "hi") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def test_text_chat_and_plain_embeddings_go_by_batch_the_rest_runs_live() -> None:
    assert refusal(JobKind.CHAT, chat()) is None
    assert refusal(JobKind.CHAT, chat(content=[{"type": "text", "text": "hi"}])) is None
    assert refusal(JobKind.EMBEDDING, {"model": "e", "input": "x"}) is None
    image = [{"type": "image_url", "image_url": {"url": "https://example.test/a.png"}}]
    assert "images" in (refusal(JobKind.CHAT, chat(content=image)) or "")
    assert "provider" in (refusal(JobKind.EMBEDDING, {"model": "e", "input": "x", "provider": {}}) or "")
    assert "no batch endpoint" in (refusal(JobKind.COMPLETION, {"model": "m", "prompt": "x"}) or "")


def test_lines_are_grouped_by_model_and_cut_at_the_request_and_byte_caps() -> None:
    chunker = Chunker(max_requests=3, max_bytes=1000)
    full: list[list[int]] = []
    for index in range(7):
        full += chunker.add(index, JobKind.CHAT, chat("a" if index % 2 == 0 else "b"), 10)
    full += chunker.add(7, JobKind.CHAT, chat("a"), 995)  # would pass the byte cap of the open "a" group
    assert full == [[0, 2, 4], [6]]
    assert sorted(chunker.rest()) == [[1, 3, 5], [7]]
