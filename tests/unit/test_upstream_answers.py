"""Reading OpenRouter's answers: wait hints in headers, and 200s that are not answers."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import aiohttp
import httpx2
import pytest

from routerq.worker.upstream.openrouter import lost_connection_as_read_error, retry_after, unusable_reason

NOW = 1_800_000_000.0


def test_retry_after_in_seconds() -> None:
    assert retry_after({"retry-after": "3"}, NOW) == 3.0
    assert retry_after({"retry-after": "0.5"}, NOW) == 0.5


def test_retry_after_as_an_http_date() -> None:
    when = format_datetime(datetime.fromtimestamp(NOW + 42, UTC), usegmt=True)
    assert retry_after({"retry-after": when}, NOW) == pytest.approx(42.0)


def test_an_http_date_in_the_past_means_no_wait() -> None:
    when = format_datetime(datetime.fromtimestamp(NOW - 100, UTC), usegmt=True)
    assert retry_after({"retry-after": when}, NOW) == 0.0


def test_openrouters_ratelimit_reset_in_epoch_milliseconds() -> None:
    assert retry_after({"x-ratelimit-reset": str(int((NOW + 9) * 1000))}, NOW) == pytest.approx(9.0)


def test_ratelimit_reset_in_epoch_seconds_and_as_a_relative_delay() -> None:
    assert retry_after({"x-ratelimit-reset": str(NOW + 4)}, NOW) == pytest.approx(4.0)
    assert retry_after({"x-ratelimit-reset": "6"}, NOW) == 6.0


def test_retry_after_wins_over_ratelimit_reset_and_garbage_is_no_hint() -> None:
    assert retry_after({"retry-after": "2", "x-ratelimit-reset": str(int((NOW + 50) * 1000))}, NOW) == 2.0
    assert retry_after({"retry-after": "soon"}, NOW) is None
    assert retry_after({"x-ratelimit-reset": "later"}, NOW) is None
    assert retry_after({}, NOW) is None


CHAT = "/api/v1/chat/completions"


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        (CHAT, {"choices": [{"message": {"content": "hi"}}]}, None),
        (CHAT, {"choices": [{"message": {"tool_calls": [{"id": "t"}]}}]}, None),
        (CHAT, {"choices": [{"message": {"refusal": "no"}}]}, None),
        (CHAT, {"choices": [{"message": {"content": ""}}]}, "answer has an empty message"),
        (CHAT, {"choices": []}, "answer has no choices"),
        (CHAT, {"choices": [{"finish_reason": "error", "message": {"content": "x"}}]}, "finish_reason=error"),
        (CHAT, ["not", "an", "object"], "answer is not a JSON object"),
        ("/api/v1/completions", {"choices": [{"text": "once"}]}, None),
        ("/api/v1/completions", {"choices": [{"text": None}]}, "answer has no text"),
        ("/api/v1/embeddings", {"data": [{"embedding": "AAAA"}]}, None),
        ("/api/v1/embeddings", {"data": [{"embedding": []}]}, "answer has no embeddings"),
        ("/api/v1/embeddings", {"data": []}, "answer has no embeddings"),
    ],
)
def test_a_200_is_an_answer_only_when_it_has_one(path: str, body: object, reason: str | None) -> None:
    found = unusable_reason(path, body)
    assert (found is None) if reason is None else (found is not None and reason in found)


def test_a_connection_the_server_dropped_is_a_read_error_not_a_timeout() -> None:
    """The aiohttp adapter maps every lost connection to a connect timeout; routerq says what it was."""
    request = httpx2.Request("POST", "https://openrouter.ai/api/v1/chat/completions")
    # as the adapter raises it on "Server disconnected": no request attached (exc.request raises)
    dropped = httpx2.ConnectTimeout("Server disconnected")
    dropped.__cause__ = aiohttp.ServerDisconnectedError()
    read_error = lost_connection_as_read_error(dropped, request)
    assert isinstance(read_error, httpx2.ReadError) and read_error.request is request
    slow = httpx2.ReadTimeout("Timeout on reading data from socket", request=request)
    slow.__cause__ = aiohttp.SocketTimeoutError()
    assert lost_connection_as_read_error(slow, request) is slow
