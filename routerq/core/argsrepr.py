"""The `argsrepr`/`kwargsrepr` headers of a Celery message: a short, truncated repr of its arguments.

Celery writes `saferepr(args, 1024)` there (at most three levels deep, about 1,024 characters), which
`celery inspect`, Flower and the worker's log show. A plain `repr(args)` would store every prompt a
second time in every message. This is Celery's algorithm (celery.utils.saferepr) for the values a
routerq message carries, JSON values, ported so that producers need not import Celery;
tests/unit/test_envelope.py compares the two on large and nested arguments.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

# Celery's AMQP.argsrepr_maxsize and kwargsrepr_maxsize, and its task_repr_maxlevels default.
REPR_MAXSIZE = 1024
REPR_MAXLEVELS = 3


@dataclass(frozen=True)
class _Literal:
    value: str
    truncate: bool  # a separator, which may be cut off; brackets are not
    direction: int  # +1 opens a container, -1 closes one


@dataclass(frozen=True)
class _Key:
    value: Any


@dataclass(frozen=True)
class _Quoted:
    value: str


@dataclass(frozen=True)
class _Seen:
    object_id: int


_KV_SEP = _Literal(": ", True, 0)
_SEP = _Literal(", ", True, 0)
_BRACKETS = {dict: ("{", "}"), list: ("[", "]"), tuple: ("(", ")")}


def _truncate(text: str, maxlen: int) -> str:
    """celery.utils.text.truncate: cut at a word boundary before `maxlen`, then '...'."""
    if maxlen and len(text) >= maxlen:
        return text[:maxlen].rsplit(" ", 1)[0] + "..."
    return text


def _items(value: dict[Any, Any] | list[Any] | tuple[Any, ...]) -> Iterator[Any]:
    if isinstance(value, dict):
        for i, (key, item) in enumerate(value.items()):
            if i:
                yield _SEP
            yield _Key(key)
            yield _KV_SEP
            yield item
    else:
        for i, item in enumerate(value):
            if i:
                yield _SEP
            yield item


def _stream(stack: deque[Iterator[Any]], maxlevels: int) -> Iterator[tuple[Any, Iterator[Any]]]:
    seen: set[int] = set()
    level = 0
    while stack:
        it = stack.popleft()
        for value in it:
            if isinstance(value, _Seen):
                seen.discard(value.object_id)
            elif isinstance(value, _Literal):
                level += value.direction
                yield value, it
            elif isinstance(value, _Key):
                yield value, it
            elif isinstance(value, bool | int | float):
                yield str(value), it
            elif isinstance(value, str):
                yield _Quoted(value), it
            elif isinstance(value, dict | list | tuple):
                start, end = _BRACKETS.get(type(value), ("[", "]"))
                if isinstance(value, tuple) and len(value) == 1:
                    end = ",)"
                if maxlevels and level >= maxlevels:
                    yield _Literal(f"{start}...{end}", False, 0), it
                    continue
                if id(value) in seen:
                    yield f"<Recursion on {type(value).__name__} with id={id(value)}>", it
                    continue
                seen.add(id(value))
                opened, closed = _Literal(start, False, +1), _Literal(end, False, -1)
                stack.append(chain([opened], _items(value), [_Seen(id(value)), closed], it))
                break
            else:
                yield repr(value), it


def safe_repr(value: Any, maxlen: int = REPR_MAXSIZE, maxlevels: int = REPR_MAXLEVELS) -> str:
    return "".join(_safe_repr(value, maxlen, maxlevels))


def _safe_repr(value: Any, maxlen: int, maxlevels: int) -> Iterator[str]:
    stack: deque[Iterator[Any]] = deque([iter([value])])
    left = maxlen
    for token, it in _stream(stack, maxlevels):
        if left <= 0:
            if isinstance(token, _Literal) and token.direction < 0:
                yield token.value
                continue
            yield ", ..."
            stack.append(chain([token], it))
            break
        if isinstance(token, _Literal):
            text = token.value
        elif isinstance(token, _Key):
            text = safe_repr(token.value, left, maxlevels)
        elif isinstance(token, _Quoted):
            text = "'{}'".format(_truncate(token.value, left).replace("'", "\\'"))
        else:
            text = _truncate(token, left)
        yield text
        left -= len(text)
    depth = 0
    for rest in stack:
        for token in rest:
            if isinstance(token, _Literal) and not token.truncate:
                depth += token.direction
                if depth < 0:
                    depth = 0
                    yield token.value
