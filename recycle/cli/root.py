"""The root of the ``recycle`` command line: the group every command module adds to, and
the one place an error becomes one line."""

from __future__ import annotations

import importlib
import os
import traceback

import click
import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException  # the errors of the copy of click typer carries

from recycle.errors import RecycleError

EPILOG = """\
Examples:

  recycle add-expert ./adapters/sentiment --task rt_sentiment --base smollm2-135m

  recycle add-expert ./adapters --recursive

  recycle experts list --json

  recycle db path
"""


# Each command's module in recycle.cli, in the order of --help. A module is imported when
# one of its commands is run (or --help lists them all): a command builds its own room's
# commands, not every room's.
COMMANDS = {
    "add-expert": "experts", "add-task": "tasks", "train-expert": "tasks", "train-gates": "gates",
    "predict": "compose", "report": "evaluate", "run": "run", "demo": "run", "train": "routers",
    "train-router": "routers", "train-gate": "routers", "train-cosmo-gate": "routers", "serve": "serve",
    "lm-eval": "lmeval", "experts": "experts", "db": "experts", "tasks": "tasks", "gates": "gates",
    "compose": "compose", "eval": "evaluate",
}


class RecycleGroup(TyperGroup):
    """Loads a command's module when it is asked for (:data:`COMMANDS`), and turns a
    RecycleError anywhere below into one line on stderr and a non-zero exit."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load(COMMANDS)
        return sorted(self.commands, key=lambda n: list(COMMANDS).index(n) if n in COMMANDS else len(COMMANDS))

    def get_command(self, ctx: click.Context, name: str):
        self._load([name])
        return super().get_command(ctx, name)

    def _load(self, names) -> None:
        modules = {COMMANDS[n] for n in names if n in COMMANDS and n not in self.commands}
        if modules:
            for module in dict.fromkeys(COMMANDS.values()):  # in table order: registration order
                if module in modules:
                    importlib.import_module(f"recycle.cli.{module}")
            for name, command in typer.main.get_command(app).commands.items():
                self.commands.setdefault(name, command)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RecycleError as e:
            if _debug(ctx):
                traceback.print_exc()
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            if _debug(ctx):
                traceback.print_exc()
            click.echo("Interrupted: what had finished is recorded whole; nothing partial was kept.", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, typer.Exit, typer.Abort,
                TyperException):
            raise  # click's own handling: usage errors exit 2 with the usage line, help is help
        except Exception as e:  # a bug, or an environment problem: still one line
            if _debug(ctx):
                traceback.print_exc()
            else:
                msg = " ".join(str(e).split())
                click.echo(
                    f"Error: {type(e).__name__}: {msg} (run with --debug for the traceback)",
                    err=True,
                )
            ctx.exit(1)


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool((root.obj or {}).get("debug")) or os.environ.get("RECYCLE_DEBUG") == "1"


app = typer.Typer(
    cls=RecycleGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    help="Recycle independently trained LoRA experts into one zero-shot model.",
    epilog=EPILOG,
    rich_markup_mode=None,
)


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
):
    """Recycle independently trained LoRA experts into one zero-shot model."""
    ctx.obj = {"debug": debug}
    _quiet_libraries()


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, advisory warnings) off; our own progress stays."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
