"""Every command documents itself."""

import click
import pytest
import typer
from typer.testing import CliRunner

from recycle.cli import app
from tests.conftest import cli

runner = CliRunner()


def _commands(group: click.Group, prefix=()):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
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


def test_every_command_is_found_where_the_lazy_root_looks():
    """The root imports a command's module only when the command is asked for: every
    command is in its table, under the module that defines it."""
    import importlib

    from recycle.cli.root import COMMANDS

    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(f"recycle.cli.{module}")
    where = {c.name: c.callback.__module__ for c in app.registered_commands}
    where.update({g.name: g.typer_instance.registered_commands[0].callback.__module__ for g in app.registered_groups})
    assert where == {name: f"recycle.cli.{module}" for name, module in COMMANDS.items()}


def test_no_args_shows_help():
    result = runner.invoke(app, [])
    assert "Usage" in result.output
    assert "add-expert" in result.output


@pytest.mark.parametrize("args", [["train-router", "c", "-x"], ["train-router", "c", "--steps", "nan"],
                                  ["eval", "--bogus"], ["compose"]])
def test_usage_errors_exit_2_without_a_traceback_line(args):
    """Typer carries its own copy of click: its usage errors are bad input (exit 2, click's
    usage message), not an internal error (exit 1)."""
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert "run with --debug" not in r.output and "Traceback" not in r.output
