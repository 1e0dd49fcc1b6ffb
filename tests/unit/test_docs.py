"""Every command and option a user can type is documented."""

from __future__ import annotations

from pathlib import Path

import click

from etl.cli import cli

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def _commands(group: click.Group, prefix: str = "etl"):
    for name, command in group.commands.items():
        path = f"{prefix} {name}"
        if isinstance(command, click.Group):
            yield from _commands(command, path)
        else:
            yield path, command


def test_every_command_is_in_the_readme() -> None:
    for path, _ in _commands(cli):
        words = path.split()
        if len(words) == 3:  # `etl db url` is documented as `etl db url|start|stop|status`
            assert f"{words[0]} {words[1]}" in README and words[2] in README, path
        else:
            assert path in README, path


def test_every_option_has_help_and_copy_options_are_in_the_readme() -> None:
    for path, command in _commands(cli):
        assert command.help, path
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"{path} {param.opts}"
    copy = cli.commands["copy"]
    for param in copy.params:
        if isinstance(param, click.Option) and param.name not in ("help", "state_schema"):
            assert any(opt in README for opt in param.opts), param.opts
