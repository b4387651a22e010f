"""Text from users as routerq stores and shows it: control characters (ESC, BEL, ...) replaced, so a
batch or file name cannot clear or recolour an operator's terminal (rich's markup escaping leaves raw
ESC alone); long values cut."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_NAME = 255


def printable(text: str, limit: int = MAX_NAME) -> str:
    return _CONTROL.sub("_", text)[:limit]
