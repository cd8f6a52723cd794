"""Adapters and base models from where users keep them: the Hugging Face Hub and its cache.

:func:`fetch` turns ``org/name`` (and an optional revision: a branch, tag or commit) into a
local folder in the user's Hugging Face cache plus the resolved commit hash, through
``huggingface_hub``: the cache first (so it works offline, ``HF_HUB_OFFLINE=1``), the hub
second. Only the files a folder of that kind needs are fetched, never a pickle (``*.bin``,
``*.pt``, ``*.pkl``) and never code. A missing entry offline, an unknown repository or
revision, or no connection is one line, at once (a bounded timeout, no retry storm).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from recycle.errors import RecycleError

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
COMMIT = re.compile(r"[0-9a-f]{40}")
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md"]
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
               "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja"]
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
TIMEOUT = 10.0  # seconds for one request to the hub


def is_hub_id(spec: str) -> bool:
    """``org/name`` that is not a path on this machine."""
    return bool(HUB_ID.fullmatch(spec)) and not Path(spec).expanduser().exists()


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_revision(revision: str) -> None:
    """A branch, tag or commit as git allows it (``git check-ref-format``), never a path:
    no ``..``, no leading ``/``, no backslash, no empty or dot-led component, no control
    characters."""
    parts = revision.split("/")
    bad = (not revision or revision.startswith(("/", "-")) or revision.endswith((".", "/", ".lock"))
           or any(not p or p.startswith(".") for p in parts) or ".." in revision or "@{" in revision
           or any(c in revision for c in "\\ ~^:?*[") or any(ord(c) < 32 or ord(c) == 127 for c in revision)
           or len(revision) > 255)
    if bad:
        raise RecycleError(f"revision {revision!r} is not a branch, tag or commit name (a path is not a revision)")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_snapshot(folder: Path, repo_id: str, cache: str | None, label: str) -> str:
    """The commit of a cached snapshot, refused unless everything in it resolves inside the
    repository's own folder of the cache: ``refs/<branch>`` must hold a commit hash, not a
    path (``../../somewhere``), the snapshot folder must be ``snapshots/<commit>`` itself,
    not a link elsewhere, and every file in it must resolve (through the cache's links to
    ``blobs/``) inside the repository's folder."""
    from huggingface_hub import constants

    root = Path(cache or constants.HF_HUB_CACHE).expanduser().resolve()
    repo_dir = root / f"models--{repo_id.replace('/', '--')}"
    commit = folder.name
    refused = f"{label}: the Hugging Face cache entry points outside the cache"
    if not COMMIT.fullmatch(commit) or folder.resolve() != repo_dir / "snapshots" / commit:
        raise RecycleError(f"{refused} ({folder}); refusing it (a tampered refs/ or snapshots/ entry?)")
    for dirpath, dirnames, filenames in os.walk(folder):  # links to folders are not followed, just checked
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            if not _inside(entry.resolve(), repo_dir):
                raise RecycleError(f"{refused} ({entry.relative_to(folder)} -> {entry.resolve()}); refusing it")
    return commit


def _label(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


def fetch(repo_id: str, revision: str | None = None, *, files: list[str], required: list[str],
          what: str = "adapter") -> tuple[Path, str]:
    """``(snapshot folder, commit hash)`` of ``repo_id`` at ``revision`` (default: main),
    holding at least ``required``; downloads ``files`` (patterns) when the cache lacks them."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not HUB_ID.fullmatch(repo_id):
        raise RecycleError(f"{repo_id!r} is not a hub id (org/name) nor an existing folder")
    if revision is not None:
        check_revision(revision)
    label = _label(repo_id, revision)
    cache = os.environ.get("HF_HUB_CACHE") or None  # read now, not when huggingface_hub was imported
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=files, local_files_only=True,
                                        cache_dir=cache))
        if all((folder / f).is_file() for f in required):
            return folder, check_snapshot(folder, repo_id, cache, label)
    except (LocalEntryNotFoundError, EntryNotFoundError, FileNotFoundError, ValueError):
        pass
    if offline():
        raise RecycleError(f"{what} {label} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
                           "(fetch it once online, or unset HF_HUB_OFFLINE)")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(TIMEOUT)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(TIMEOUT)))
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=files, etag_timeout=TIMEOUT,
                                        cache_dir=cache))
    except RevisionNotFoundError:
        raise RecycleError(f"{repo_id} has no revision {revision!r} on the hub") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise RecycleError(f"no {what} repository {repo_id} on the hub (or it is private or gated: log in with "
                           "hf auth login)") from None
    except LocalEntryNotFoundError:
        raise RecycleError(f"cannot reach the hub for {label}, and it is not in the local cache") from None
    except HfHubHTTPError as e:
        raise RecycleError(f"the hub refused {label}: {' '.join(str(e).split())[:200]}") from None
    except OSError as e:
        raise RecycleError(f"cannot fetch {label} from the hub: {' '.join(str(e).split())[:200]}") from None
    missing = [f for f in required if not (folder / f).is_file()]
    if missing:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLES) if folder.is_dir() else []
        why = (f"; it holds only {', '.join(pickles)} (a pickle, which recycle never loads)" if pickles else "")
        raise RecycleError(f"{what} {label} has no {', '.join(missing)}{why}")
    return folder, check_snapshot(folder, repo_id, cache, label)


def fetch_adapter(repo_id: str, revision: str | None = None) -> tuple[Path, str]:
    """An adapter repository: its config and safetensors weights (never ``adapter_model.bin``)."""
    folder, commit = fetch(repo_id, revision, files=ADAPTER_FILES, required=["adapter_config.json"], what="adapter")
    if not (folder / "adapter_model.safetensors").is_file():
        raise RecycleError(f"adapter {_label(repo_id, revision)} has no adapter_model.safetensors (recycle reads "
                           "safetensors only, never a pickled adapter_model.bin)")
    return folder, commit


def fetch_model(repo_id: str, revision: str | None = None) -> tuple[Path, str]:
    """A base model repository: config, safetensors weights and tokenizer files."""
    return fetch(repo_id, revision, files=MODEL_FILES, required=["config.json"], what="base model")


def read_list(path: str | Path) -> list[tuple[str, str | None]]:
    """A collection file: one ``org/name [revision]`` a line; blank lines and ``#`` comments
    skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecycleError(f"cannot read {path}: {e}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2 or not HUB_ID.fullmatch(parts[0]):
            raise RecycleError(f"{path}:{n}: expected 'org/name [revision]', got {line!r}")
        out.append((parts[0], parts[1] if len(parts) == 2 else None))
    if not out:
        raise RecycleError(f"{path}: no adapters listed")
    return out
