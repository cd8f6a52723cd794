"""Pieces every command shares: the --db option, consoles, the registry opener, JSON out."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from recycle.registry import ENV_DB, Registry

# Tables and results to stdout; logs, progress and errors to stderr. Piped to a file,
# tables keep their full width instead of being squeezed into 80 columns.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 250)
err_console = Console(stderr=True, soft_wrap=True)

DbOption = Annotated[
    Optional[Path],
    typer.Option(
        "--db",
        envvar=ENV_DB,
        help="Registry database file (default ./registry.db).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
AddressOption = Annotated[
    Optional[str],
    typer.Option(
        help="Ray cluster to use: 'auto' or host:port (default: RAY_ADDRESS, else a local Ray "
        "started for this command).",
        show_default=False,
    ),
]


def progress() -> Progress:
    """The progress bar of long work (spinner, bar, M/N done, elapsed), on stderr."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


def open_registry(db: Path | None) -> Registry:
    return Registry(db)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    err_console.print(message, highlight=False)
