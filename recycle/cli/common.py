"""Pieces every command shares: the --db option, the registry opener, JSON out."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from recycle.console import console, err_console, info, progress  # noqa: F401  (re-exported for the commands)
from recycle.registry import ENV_DB, Registry

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


def open_registry(db: Path | None, *, create: bool = True) -> Registry:
    """The registry; read-only commands pass ``create=False`` (no new file behind a typo).
    A missing file is created by the command's first write, so a command refused before it
    records anything leaves no file behind."""
    return Registry(db, create=create, lazy=True)


def jsonable(value: Any) -> Any:
    """``value`` with NaN and infinities as null (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(jsonable(value), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def split(s: str | None) -> list[str]:
    """A comma-separated option as a list (blanks dropped)."""
    return [x.strip() for x in (s or "").split(",") if x.strip()]
