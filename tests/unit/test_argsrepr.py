"""routerq's argsrepr is Celery's saferepr for every JSON value a message can carry."""

from __future__ import annotations

import random
import string
from typing import Any

import pytest
from celery.utils.saferepr import saferepr

from routerq.core.argsrepr import REPR_MAXSIZE, safe_repr


def json_value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.random()
    if depth >= 4 or pick < 0.4:
        return rng.choice(
            [
                "".join(rng.choice(string.ascii_letters + " '\"\\é") for _ in range(rng.randint(0, 30))),
                "many words " * rng.randint(50, 400),
                rng.randint(-(10**9), 10**9),
                rng.random() * 1e6,
                rng.random() < 0.5,
                None,
            ]
        )
    if pick < 0.7:
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 8))]
    return {
        "".join(rng.choices(string.ascii_lowercase, k=4)): json_value(rng, depth + 1)
        for _ in range(rng.randint(0, 6))
    }


@pytest.mark.parametrize("maxlen", [REPR_MAXSIZE, 60, 1])
def test_argsrepr_matches_celerys_saferepr_on_random_json_arguments(maxlen: int) -> None:
    rng = random.Random(maxlen)
    for _ in range(400):
        args = [json_value(rng) for _ in range(rng.randint(1, 3))]
        assert safe_repr(args, maxlen) == saferepr(args, maxlen), args


def test_a_large_prompt_is_cut_to_about_a_kilobyte() -> None:
    args = [{"body": {"model": "m", "prompt": "word " * 100_000}}]
    assert len(safe_repr(args)) < REPR_MAXSIZE + 20
    assert safe_repr(args) == saferepr(args, REPR_MAXSIZE)
