"""Keeps secrets out of everything routerq writes: logs, stored errors, span text.

Logs are redacted where a record becomes text: each handler's formatter is wrapped, so the message,
its arguments, a traceback and stack info are all redacted after formatting, whatever library logged
them. Records themselves are never changed (changing `args` breaks formatters that read them, such
as uvicorn's access formatter), and a record that cannot be formatted is still written, redacted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

MASK = "[REDACTED]"


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


class RedactingFormatter(logging.Formatter):
    """Formats as the wrapped formatter does, then masks every secret."""

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self.inner = inner
        self._secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        try:
            text = self.inner.format(record)
        except Exception as exc:  # a bad format string or arguments: the line is still written
            text = f"{record.levelname} {record.name}: {record.msg!s} (unformattable arguments: {exc!r})"
        return redact(text, self._secrets)


def redact_handlers(secrets: Iterable[str], loggers: Iterable[logging.Logger] = ()) -> None:
    """Wrap the formatter of every handler of the root logger, of every logger configured so far,
    of `loggers`, and of logging's last-resort handler. Safe to call again after more logging is
    configured (a wrapped formatter is not wrapped twice)."""
    known = [logging.getLogger(), *loggers]
    known += [v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger)]
    handlers = {h for logger in known for h in logger.handlers}
    if logging.lastResort is not None:
        handlers.add(logging.lastResort)
    values = list(secrets)
    for handler in handlers:
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter or logging.Formatter(), values))
