"""Every `etl …` command line in the README's shell examples is one the CLI accepts: its
command exists, its options exist and take the values given, nothing required is missing.
(The examples name databases the reader has; docs/cli.md's tour, which runs as a test, does
the same things against real ones.)"""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import click
import pytest

from etl.cli import cli

README = Path(__file__).resolve().parents[2] / "README.md"


def command_lines(text: str) -> list[str]:
    """The `etl …` lines of the sh/console blocks, continuation lines joined, comments cut."""
    found = []
    for block in re.findall(r"^```(?:sh|console|bash)\n(.*?)^```", text, flags=re.S | re.M):
        current = ""
        for raw in block.splitlines():
            line = raw.rstrip()
            line = line[2:] if line.startswith("$ ") else line
            current = f"{current} {line.strip()}" if current else line.strip()
            if current.endswith("\\"):
                current = current[:-1]
                continue
            command = re.split(r"\s+#", current, maxsplit=1)[0].strip()
            if command.startswith("etl ") and " [" not in command:  # not a usage synopsis
                found.append(command)
            current = ""
    return found


LINES = command_lines(README.read_text(encoding="utf-8"))


def test_the_readme_has_command_examples() -> None:
    assert len(LINES) >= 30


@pytest.mark.parametrize("line", LINES)
def test_a_readme_command_line_parses(line: str) -> None:
    args = shlex.split(line)[1:]
    group: click.Group = cli
    ctx = group.make_context("etl", list(args), resilient_parsing=False)
    while True:
        with warnings.catch_warnings():  # click 8.2 moves the sub-command into ctx.args
            warnings.simplefilter("ignore", DeprecationWarning)
            tokens = [*ctx.protected_args, *ctx.args]
        name, command, rest = group.resolve_command(ctx, tokens)
        assert command is not None, line
        sub = command.make_context(name or "", list(rest), parent=ctx)  # raises if wrong
        if not isinstance(command, click.Group):
            break
        group, ctx = command, sub


def test_a_wrong_line_is_caught() -> None:
    with pytest.raises(click.UsageError):
        test_a_readme_command_line_parses("etl copy --table t --no-such-option 1")
    with pytest.raises(click.UsageError):
        test_a_readme_command_line_parses("etl export --table t")  # --to is required
