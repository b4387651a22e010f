"""`make demo` (= `routerq demo`) works on embedded defaults, with the local OpenRouter stand-in."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROUTERQ

from routerq.devstack.fake_openrouter import fake_answer


# `routerq demo` takes Redis's and Phoenix's usual ports when they are free: two demos at once would
# race for them, so the demo tests run one after the other in one pytest-xdist session.
@pytest.mark.xdist_group("routerq-demo")
def test_demo_runs_every_kind_and_prints_the_phoenix_url(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS_", "OPENROUTER_", "PHOENIX_", "ROUTERQ_"))
    }
    done = subprocess.run(
        [ROUTERQ, "demo", "--no-keep"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert (
        f"chat: {fake_answer('meta-llama/llama-3.1-8b-instruct', 'Write a haiku about observability.')}"
        in lines
    )
    assert f"completion: {fake_answer('mistralai/mistral-7b-instruct', 'Once upon a time')}" in lines
    assert "embedding: 1 embedding(s) of dimension 1536" in lines
    assert any(x.startswith("batch: batch_") and x.endswith("completed 7/7") for x in lines), lines
    assert "embed: 8 vectors" in lines
    assert len((tmp_path / ".routerq" / "batch-results.jsonl").read_text().splitlines()) == 7
    assert "using the local OpenRouter stand-in" in done.stderr
    assert "Phoenix: http://127.0.0.1:" in done.stderr
    assert "stopped the local stack" in done.stderr
    assert not (tmp_path / ".routerq" / "stack.json").exists()
