"""The built-in tasks: ordinary TOML specs over files shipped in PyPI packages."""

from __future__ import annotations

from pathlib import Path

from recycle.errors import RecycleError
from recycle.tasks.spec import TaskSpec, load_spec_file

FOLDER = Path(__file__).parent


def catalogue_names() -> list[str]:
    return sorted(p.stem for p in FOLDER.glob("*.toml"))


def catalogue_spec(name: str) -> TaskSpec:
    path = FOLDER / f"{name}.toml"
    if not path.is_file():
        raise RecycleError(f"no built-in task {name!r} (built-in: {', '.join(catalogue_names())})")
    return load_spec_file(path)


def catalogue_specs(names: list[str] | None = None) -> list[TaskSpec]:
    return [catalogue_spec(n) for n in (names or catalogue_names())]
