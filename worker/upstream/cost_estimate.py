"""What a request will use before it is made: tokens for the rate limiter, dollars for a budget.

Rough on purpose (4 characters a token): an estimate only has to be on the safe side of a limit, and
`usage` corrects it after the call.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

# A request with no `max_tokens` may answer at any length; until a batch has answers to measure, a
# completion is taken to be this long (a few paragraphs: bulk generation's usual answer).
COMPLETION_GUESS_TOKENS = 256
# OpenRouter bills its batches at about half the per-token price (../shared/reference/openrouter.md).
BATCH_PRICE_RATIO = 0.5


def prompt_tokens(body: dict[str, Any]) -> int:
    return len(json.dumps(body.get("messages") or body.get("prompt") or body.get("input") or "")) // 4


def completion_budget(body: dict[str, Any]) -> int | None:
    """The completion length the request allows, when it sets one."""
    budget = body.get("max_tokens") or body.get("max_completion_tokens")
    return int(budget) if isinstance(budget, int | float | str) and str(budget).isdigit() else None


def estimate_tokens(body: dict[str, Any]) -> int:
    """Prompt size plus the completion budget the request allows."""
    return prompt_tokens(body) + (completion_budget(body) or COMPLETION_GUESS_TOKENS)


def batch_line_cost(
    bodies: Iterable[dict[str, Any]], price: tuple[float, float], completion_tokens: float | None
) -> float:
    """The mean cost of one line of an upstream batch, at the batch price. `price` is USD per prompt
    and per completion token; `completion_tokens` the batch's mean completion so far, when it has
    one (a request's own `max_tokens` bounds it better)."""
    total, count = 0.0, 0
    for body in bodies:
        completion = completion_budget(body) or completion_tokens or COMPLETION_GUESS_TOKENS
        total += prompt_tokens(body) * price[0] + (0 if "input" in body else completion) * price[1]
        count += 1
    return BATCH_PRICE_RATIO * total / max(count, 1)
