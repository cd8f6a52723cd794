"""Writing files so that a reader never sees half of one: every artifact recycle writes
(gates, router parameters, prototypes, result tables, plots, predictions, trained adapter
folders) goes to a temporary name in the destination's folder and is renamed into place.

A process killed mid-write leaves at most a ``.NAME.*.tmp`` file (or folder) behind, never a
truncated ``NAME``; :func:`remove_temps` sweeps them.

Only a regular file is ever replaced: an output path that names a folder, a device
(``/dev/null``, ``/dev/full``), a socket or a FIFO is refused in one line, and so is a folder
that cannot be written. A symlink is written through: the temporary file goes beside the
link's final target and is renamed over the target, so the link stays a link and now points
at the new content (:func:`output_target`).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from recycle.errors import RecycleError


def temp_name(path: Path) -> Path:
    """A fresh temporary sibling of ``path`` (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def output_target(path: str | os.PathLike, *, make_parents: bool = False) -> Path:
    """Where writing ``path`` really goes, checked before any work is done: a symlink's final
    target (written through), refused in one line when that is anything but a regular file
    or a new name, or when its folder is missing (and not to be made) or not writable."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path.absolute()
    shown = str(path) if target == path.absolute() else f"{path} (a link to {target})"
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise RecycleError(f"cannot write {shown}: {e.strerror}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise RecycleError(f"cannot write {shown}: it is {_kind(st.st_mode)}, not a regular file; "
                           "give the path of a file")
    writable_folder(target.parent, shown, make_parents)
    return target


def writable_folder(folder: Path, shown: str, make_parents: bool) -> None:
    """``folder`` exists (made if ``make_parents``) and can take new files, or one line."""
    if not folder.is_dir():
        if not make_parents:
            raise RecycleError(f"cannot write {shown}: its folder {folder} does not exist")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RecycleError(f"cannot write {shown}: cannot make its folder {folder} ({e.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RecycleError(f"cannot write {shown}: its folder {folder} is not writable")


@contextmanager
def atomic_path(path: str | os.PathLike, *, make_parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to ``path``, on any error
    (or interrupt) it is removed and ``path`` is left as it was. ``path`` is checked first
    (:func:`output_target`): only a regular file or a new name is replaced, through a symlink
    to its target; an error writing (disk full, permissions) is one line."""
    target = output_target(path, make_parents=make_parents)
    tmp = temp_name(target)
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as e:
            raise RecycleError(f"cannot write {path}: {e.strerror}") from None
        os.close(fd)
        try:
            yield tmp
            old = os.lstat(target) if os.path.lexists(target) else None
            if old is not None and not stat.S_ISREG(old.st_mode):  # something else appeared meanwhile
                raise RecycleError(f"cannot write {path}: it is now {_kind(old.st_mode)}, not a regular file")
            if old is not None:
                os.chmod(tmp, stat.S_IMODE(old.st_mode))  # a replaced file keeps its permissions
            os.replace(tmp, target)
        except OSError as e:
            raise RecycleError(f"cannot write {path}: {e.strerror or e}") from None
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
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise RecycleError(f"cannot write the folder {dest}: a file or link of that name is in the way")
    writable_folder(dest.absolute().parent, str(dest), make_parents=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as e:
        raise RecycleError(f"cannot write {dest}: {e.strerror}") from None
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
