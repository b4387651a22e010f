"""Keeps secrets out of everything routerq writes: logs, stored errors, span text."""

from __future__ import annotations

import logging
from collections.abc import Iterable

MASK = "[REDACTED]"


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites log records that would print a secret, whatever library logged them."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            cleaned = redact(message, self._secrets)
            if cleaned != message:
                record.msg, record.args = cleaned, None
        return True
