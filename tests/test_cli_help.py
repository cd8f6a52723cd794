"""Every command documents itself."""

import click
import typer
from typer.testing import CliRunner

from recycle.cli import app

runner = CliRunner()


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))


def test_every_command_has_help_text():
    root = typer.main.get_command(app)
    names = list(_commands(root))
    assert ("add-expert",) in [n for n, _ in names]
    for path, cmd in names:
        assert (cmd.help or "").strip(), f"{' '.join(path)} has no help"
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)


def test_no_args_shows_help():
    result = runner.invoke(app, [])
    assert "Usage" in result.output
    assert "add-expert" in result.output
