"""bench/RESULTS.md: each benchmark owns a section between its own markers and rewrites only that."""

from __future__ import annotations

import time
from pathlib import Path

from bench.__main__ import machine

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = ["| measure | value |", "|---|---|"]


def table(rows: list[tuple[str, str]]) -> str:
    return "\n".join([*HEADER, *(f"| {k} | {v} |" for k, v in rows)])


def section(begin: str, end: str, title: str, setup: str, body: str) -> str:
    """A section with the machine and date the numbers were measured on."""
    return (
        f"{begin}\n## {title}\n\n"
        f"Machine: {machine()}  \nDate: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  \n"
        f"{setup}\n\n{body}\n{end}"
    )


def put_section(begin: str, end: str, text_of_section: str) -> None:
    """Replace the section between the markers, or append it when it is new."""
    text = RESULTS.read_text() if RESULTS.exists() else "# routerq benchmark\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + text_of_section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + text_of_section + "\n"
    RESULTS.write_text(text)


def section_rows(begin: str, end: str) -> list[str]:
    """The table rows already in a section (for a run that re-measures only some of them)."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if begin not in text or end not in text:
        return []
    return [r for r in text[text.index(begin) : text.index(end)].splitlines() if r.startswith("| ")]
