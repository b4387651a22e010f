"""Secrets are masked where a log record becomes text, for every logger, and no line is lost."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from uvicorn.logging import AccessFormatter

from routerq.core.redaction import MASK, redact_handlers

SECRET = "sk-or-v1-" + "5" * 40


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    logger = logging.getLogger("routerq.tests.redaction")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, stream
    logger.removeHandler(handler)


def test_a_secret_in_a_message_its_arguments_or_a_traceback_is_masked(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    redact_handlers([SECRET], [logger])
    logger.info("GET /v1/files/%s", SECRET)
    try:
        raise LookupError(f"No such file: {SECRET}")
    except LookupError:
        logger.exception("request crashed")
    out = stream.getvalue()
    assert SECRET not in out
    assert f"GET /v1/files/{MASK}" in out and f"LookupError: No such file: {MASK}" in out


def test_a_record_that_cannot_be_formatted_is_still_written_masked(
    captured: tuple[logging.Logger, io.StringIO], capsys: pytest.CaptureFixture[str]
) -> None:
    logger, stream = captured
    redact_handlers([SECRET], [logger])
    logger.info("%d calls for %s", "not a number", SECRET)
    assert "unformattable arguments" in stream.getvalue() and SECRET not in stream.getvalue()
    assert "Logging error" not in capsys.readouterr().err


def test_uvicorns_access_line_keeps_its_format_and_loses_the_secret(
    captured: tuple[logging.Logger, io.StringIO], capsys: pytest.CaptureFixture[str]
) -> None:
    logger, stream = captured
    logger.handlers[0].setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s'))
    redact_handlers([SECRET], [logger])
    logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", f"/v1/files/{SECRET}", "1.1", 404)
    line = stream.getvalue().strip()
    assert line == f'127.0.0.1:5000 - "GET /v1/files/{MASK} HTTP/1.1" 404 Not Found'
    assert "Logging error" not in capsys.readouterr().err


def test_redacting_twice_wraps_a_handler_once(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, _ = captured
    redact_handlers([SECRET], [logger])
    first = logger.handlers[0].formatter
    redact_handlers([SECRET], [logger])
    assert logger.handlers[0].formatter is first
