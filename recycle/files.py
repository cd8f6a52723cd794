"""Writing files so that a reader never sees half of one: every artifact recycle writes
(gates, router parameters, prototypes, result tables, plots, predictions, trained adapter
folders) goes to a temporary name in the destination's folder and is renamed into place.

A process killed mid-write leaves at most a ``.NAME.*.tmp`` file (or folder) behind, never a
truncated ``NAME``; :func:`remove_temps` sweeps them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from recycle.errors import RecycleError


def temp_name(path: Path) -> Path:
    """A fresh temporary sibling of ``path`` (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike, *, make_parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to ``path``, on any error
    (or interrupt) it is removed and ``path`` is left as it was."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise RecycleError(f"cannot write {path}: its folder does not exist")
    if path.is_dir():
        raise RecycleError(f"cannot write {path}: it is a folder")
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, *, make_parents: bool = True) -> Path:
    with atomic_path(path, make_parents=make_parents) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, value, *, make_parents: bool = True) -> Path:
    return write_text(path, json.dumps(value, indent=2, default=str) + "\n", make_parents=make_parents)


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    """Safetensors, atomically. Metadata values that are not strings are stored as JSON."""
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return Path(path)


def load_tensors(path: str | os.PathLike, what: str = "tensors") -> dict:
    """A safetensors file as ``{name: tensor}`` (never a pickle); one clear error if it is
    missing or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise RecycleError(f"cannot read {what} {path}: {' '.join(str(e).split())}") from None


def tensor_metadata(path: str | os.PathLike) -> dict:
    """The metadata stored with a safetensors file, JSON values decoded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def replace_dir(build: Callable[[Path], None], dest: str | os.PathLike, *, keep_existing: bool = False) -> Path:
    """Run ``build(tmp_folder)`` and rename the folder to ``dest``. An existing ``dest`` is
    replaced (moved aside, then deleted), or kept when ``keep_existing`` (another process
    built the same thing first)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        build(tmp)
        if dest.exists():
            if keep_existing:
                shutil.rmtree(tmp, ignore_errors=True)
                return dest
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", suffix=".tmp", dir=dest.parent))
            os.rename(dest, old / dest.name)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, dest)
            except OSError:
                if not keep_existing or not dest.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def remove_temps(path: str | os.PathLike) -> None:
    """Delete the temporary siblings :func:`atomic_path` may have left for ``path``."""
    path = Path(path)
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{path.name}.*.tmp"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
