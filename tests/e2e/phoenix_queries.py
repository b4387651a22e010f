"""Reading spans and costs back from the real Phoenix the tests run against."""

from __future__ import annotations

import time
from typing import Any

import httpx
from phoenix.client import Client

Span = dict[str, Any]


def trace_spans(
    phoenix_url: str, project: str, trace_id: str, expect: int, timeout: float = 60
) -> list[Span]:
    """Poll until the trace holds `expect` spans; Phoenix ingests asynchronously."""
    client = Client(base_url=phoenix_url)
    deadline = time.monotonic() + timeout
    spans: list[Span] = []
    while time.monotonic() < deadline:
        try:
            spans = list(client.spans.get_spans(project_identifier=project, trace_ids=[trace_id], limit=1000))
        except Exception:
            spans = []
        if len(spans) >= expect:
            return spans
        time.sleep(0.5)
    names = [s["name"] for s in spans]
    raise AssertionError(f"trace {trace_id}: wanted {expect} spans, Phoenix has {len(spans)}: {names}")


def all_spans(phoenix_url: str, project: str) -> list[Span]:
    """Every span of the project (thousands by the end of the suite: allow the time it takes)."""
    client = Client(base_url=phoenix_url)
    return list(client.spans.get_spans(project_identifier=project, limit=1_000_000, timeout=300))


def by_name(spans: list[Span], prefix: str) -> Span:
    matches = [s for s in spans if s["name"].startswith(prefix)]
    assert len(matches) == 1, f"want one span named {prefix}*, got {[s['name'] for s in spans]}"
    return matches[0]


def span_cost(phoenix_url: str, span: Span, timeout: float = 30) -> float | None:
    """Phoenix's own cost for a span (GraphQL costSummary), waiting for ingestion to price it."""
    query = "query($id: ID!) { node(id: $id) { ... on Span { costSummary { total { cost } } } } }"
    deadline = time.monotonic() + timeout
    cost = None
    while time.monotonic() < deadline:
        response = httpx.post(
            f"{phoenix_url}/graphql", json={"query": query, "variables": {"id": span["id"]}}
        )
        response.raise_for_status()
        cost = response.json()["data"]["node"]["costSummary"]["total"]["cost"]
        if cost is not None:
            return float(cost)
        time.sleep(0.5)
    return cost
