"""What `routerq --help` shows a person: every command and argument explained, flags shown as flags."""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest
import typer
from typer.testing import CliRunner

from routerq.cli.app import app

COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_shows_flags_without_a_value_type(command: str) -> None:
    """A flag takes no value: `--help <bool>` or `--wait <bool>` would tell a person to type one."""
    text = _help(*([command] if command else []))
    assert "<bool>" not in text and "BOOLEAN" not in text, text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_argument_and_option_has_help_text(command: str) -> None:
    group = typer.main.get_command(app)
    params = group.commands[command].params  # type: ignore[attr-defined]
    unexplained = [p.name for p in params if not getattr(p, "help", None)]
    assert not unexplained, f"routerq {command}: no help text for {unexplained}"


def test_arguments_are_named_for_what_they_take() -> None:
    """BATCH, FILE, PROMPT, JOB: the names the README and the error messages use."""
    usage = {command: _help(command).split("\n\n")[0] for command in COMMANDS}
    for command, name in {"status": "BATCH", "results": "BATCH", "submit": "FILE", "enqueue": "PROMPT",
                          "result": "JOB", "embed": "FILE"}.items():  # fmt: skip
        assert re.search(rf"\b{name}\b", _help(command)), f"routerq {command}'s usage does not name {name}"
    assert all("batch_id" not in text for text in usage.values())


def test_version_prints_the_installed_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"routerq {version('routerq')}"
