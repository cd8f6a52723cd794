"""Registering, removing and verifying experts: the one path every adapter enters by."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from recycle.adapters import (CONFIG, WEIGHTS, AdapterError, AdapterInfo, check_and_hash, find_adapter_folders,
                               inspect_adapter, sha256_file)
from recycle.basemodels import BaseRef, module_shapes, resolve_base
from recycle.errors import RecycleError
from recycle.names import check_name
from recycle.records import Expert
from recycle.registry import Registry, encode_json


@dataclass
class BaseCache:
    """Resolved bases and their module shapes, shared across one multi-adapter call."""

    refs: dict[str, BaseRef] = field(default_factory=dict)
    shapes: dict[str, dict | None] = field(default_factory=dict)

    def ref(self, spec: str) -> BaseRef:
        if spec not in self.refs:
            self.refs[spec] = resolve_base(spec)
        return self.refs[spec]

    def module_shapes(self, ref: BaseRef) -> dict | None:
        key = f"{ref.name}:{ref.config_hash}"
        if key not in self.shapes:
            try:
                self.shapes[key] = module_shapes(ref)
            except RecycleError:
                raise
            except Exception:  # a model class transformers can't build offline: skip checks
                self.shapes[key] = None
        return self.shapes[key]


def parse_meta(pairs: list[str] | None) -> dict:
    meta = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise RecycleError(f"--meta {pair!r} is not KEY=VALUE")
        k, v = pair.split("=", 1)
        if not k.strip():
            raise RecycleError(f"--meta {pair!r} has an empty key")
        meta[k.strip()] = v
    return meta


def add_expert(
    registry: Registry,
    path: str | Path,
    *,
    name: str | None = None,
    task: str | None = None,
    dataset: str | None = None,
    base: str | None = None,
    meta: dict | None = None,
    replace: bool = False,
    group_base: BaseRef | None = None,
    cache: BaseCache | None = None,
    default_name: str | None = None,
) -> dict:
    """Validate and register one adapter folder; returns its row plus ``status``:
    ``added``, ``unchanged`` (same content already registered) or ``replaced``.

    ``group_base`` is the base of the other adapters added in the same call: an
    adapter on another base is refused.
    """
    registry.check_writable()
    cache = cache or BaseCache()
    folder = Path(path).expanduser()
    info = inspect_adapter(folder, check_values=False)  # structure, header, ranks, before touching the base
    ref = _check_base(info, base, group_base, cache)
    # the base's shapes, then the weights read once: hashed, header and values checked (the
    # same bytes; reading the file again for each would double a large library's I/O)
    sha = check_and_hash(info, cache.module_shapes(ref))
    explicit_name = name is not None
    name = name if name is not None else (default_name or info.path.name)
    try:
        check_name("expert", name)
    except RecycleError as e:
        raise AdapterError(f"{info.path}: {e}" + ("" if name != info.path.name else "; give one with --name")) from None
    return _record(registry, info, ref, sha, name, task, dataset, meta or {}, replace, explicit_name)


def add_from_hub(registry: Registry, repo_id: str, revision: str | None = None, *, name: str | None = None,
                 meta: dict | None = None, **kw) -> dict:
    """Register an adapter from the Hugging Face Hub (or the user's HF cache): fetched as
    safetensors only, validated exactly as a folder, recorded with the commit it resolved
    to. An expert already registered from that repository at that commit is left as it is."""
    from recycle import hub

    folder, commit = hub.fetch_adapter(repo_id, revision)
    for e in registry.experts():
        h = e.hub or {}
        if h.get("repo") == repo_id and h.get("commit") == commit and name in (None, e.name):
            return {**e.to_dict(), "status": "unchanged"}
    source = {"repo": repo_id, "revision": revision or "main", "commit": commit}
    return add_expert(registry, folder, name=name, default_name=repo_id.split("/", 1)[1],
                      meta={**(meta or {}), "hub": source}, **kw)


def _outside_cache(folder: Path, source: dict) -> str | None:
    """Why a hub expert's snapshot no longer lies inside the cache it was registered from
    (a file linked elsewhere), or None."""
    from recycle import hub

    try:
        hub.check_snapshot(folder, source["repo"], str(folder.parent.parent.parent), source["repo"])
    except RecycleError as e:
        return str(e)
    return None


def _check_base(info: AdapterInfo, base: str | None, group_base: BaseRef | None, cache: BaseCache) -> BaseRef:
    if base:
        ref = cache.ref(base)
        if info.base_model and not ref.matches(info.base_model):
            raise AdapterError(
                f"{info.path}: trained on base model {info.base_model!r}, not {ref.name!r} (--base)"
            )
    elif group_base is not None:
        ref = group_base
        if info.base_model and not ref.matches(info.base_model):
            raise AdapterError(
                f"{info.path}: trained on base model {info.base_model!r}, not {ref.name!r} "
                "like the other adapters in this call"
            )
    elif info.base_model:
        ref = cache.ref(info.base_model)
    else:
        raise AdapterError(
            f"{info.path}: {info.path.name}/adapter_config.json names no base model; pass --base"
        )
    if group_base is not None and (ref.name, ref.config_hash) != (group_base.name, group_base.config_hash):
        raise AdapterError(
            f"{info.path}: base model {ref.name!r} differs from {group_base.name!r} "
            "of the other adapters in this call"
        )
    return ref


def file_stamps(folder: Path) -> dict:
    """Size and mtime of an adapter's two files (the cheap "unchanged?" check)."""
    w, c = (Path(folder) / WEIGHTS).stat(), (Path(folder) / CONFIG).stat()
    return {"weights_size": w.st_size, "weights_mtime_ns": w.st_mtime_ns,
            "config_size": c.st_size, "config_mtime_ns": c.st_mtime_ns}


def _record(registry, info, ref, sha, name, task, dataset, meta, replace, explicit_name=False) -> dict:
    row = {
        "name": name,
        "path": str(info.path),
        "sha256": sha,
        "config_sha256": sha256_file(info.path / CONFIG),
        **file_stamps(info.path),
        "peft_type": info.peft_type,
        "rank": info.rank,
        "ranks": encode_json(info.rank_overrides) if info.rank_overrides else None,
        "alpha": info.alpha,
        "use_rslora": int(info.use_rslora),
        "target_modules": encode_json(info.target_modules),
        "n_params": info.n_params,
        "task": task,
        "dataset": dataset,
        "meta": encode_json(meta) if meta else None,
    }
    return registry.record_expert(row, base=(ref.name, ref.kind, ref.config_hash), replace=replace,
                                  explicit_name=explicit_name)


def file_problem(registry: Registry, expert: Expert) -> str | None:
    """Why an expert's adapter folder no longer holds what was registered (missing files,
    other weights, another config), or None. Cheap when nothing changed: the files' sizes
    and mtimes are compared first, the hashes only when those differ (and then recorded,
    if the content is unchanged)."""
    folder = Path(expert.path)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        return (f"adapter of expert {expert.name} is missing at {folder} "
                "(moved? see: recycle experts verify --search FOLDER --fix)")
    stamps = file_stamps(folder)
    if all(getattr(expert, k) == v for k, v in stamps.items()) and expert.config_sha256:
        return None
    if sha256_file(folder / WEIGHTS) != expert.sha256:
        what = "weights"
    elif expert.config_sha256 and sha256_file(folder / CONFIG) != expert.config_sha256:
        what = "adapter_config.json"
    else:
        registry.set_expert_files(expert.id, {"config_sha256": sha256_file(folder / CONFIG), **stamps})
        return None
    return (f"the {what} of expert {expert.name} changed on disk since it was registered; "
            f"re-register it with: recycle add-expert {folder} --name {expert.name} --replace")


def check_files(registry: Registry, expert: Expert) -> Expert:
    """The expert's row, refused in one line if its files changed (see :func:`file_problem`)."""
    problem = file_problem(registry, expert)
    if problem:
        raise RecycleError(problem)
    return registry.expert(expert.name) if not expert.config_sha256 else expert


def remove_expert(registry: Registry, name: str) -> dict:
    return registry.remove_expert(name)


def verify_experts(registry: Registry, search: list[Path] | None = None, fix: bool = False) -> list[dict]:
    """Re-hash every expert's weights and config: ``ok``, ``modified``, ``missing`` or ``moved``.

    ``search`` folders are scanned for adapters whose weights hash matches a missing
    expert's (``moved``, with the new path); ``fix`` records the new path, and fetches a
    hub expert whose cache entry is gone again at its recorded commit. A hub expert must be
    the snapshot of its recorded commit.
    """
    found: dict[str, Path] | None = None
    report = []
    for e in registry.experts():
        folder = Path(e.path)
        entry = {"name": e.name, "path": e.path, "status": "ok", "detail": ""}
        source = e.hub
        if source and not (folder / WEIGHTS).is_file() and fix:
            from recycle import hub

            try:
                folder, _ = hub.fetch_adapter(source["repo"], source["commit"])
            except RecycleError as err:
                entry.update(status="missing", detail=str(err))
                report.append(entry)
                continue
            registry.set_expert_path(e.id, str(folder))
            entry.update(status="moved", detail=f"fetched again at {folder} (path updated)", new_path=str(folder))
        if source and folder.name != source["commit"]:
            entry.update(status="modified", detail=f"not the snapshot of {source['repo']} commit {source['commit']}")
        elif source and folder.is_dir() and (outside := _outside_cache(folder, source)):
            entry.update(status="modified", detail=outside)
        elif (folder / WEIGHTS).is_file():
            if sha256_file(folder / WEIGHTS) != e.sha256:
                entry.update(status="modified", detail="weights differ from the registered sha256")
            elif not (folder / CONFIG).is_file():
                entry.update(status="missing", detail="adapter_config.json not found")
            elif e.config_sha256 and sha256_file(folder / CONFIG) != e.config_sha256:
                entry.update(status="modified", detail="adapter_config.json differs from the registered one")
        else:
            if found is None:
                found = _index_by_hash(search or [])
            if e.sha256 in found:
                new = found[e.sha256]
                entry.update(status="moved", detail=f"now at {new}", new_path=str(new))
                if fix:
                    registry.set_expert_path(e.id, str(new))
                    entry["detail"] += " (path updated)"
            else:
                what = "folder" if not folder.exists() else "adapter_model.safetensors"
                entry.update(status="missing", detail=f"{what} not found")
        report.append(entry)
    return report


def _index_by_hash(roots: list[Path]) -> dict[str, Path]:
    out = {}
    for root in roots:
        for folder in find_adapter_folders(Path(root)):
            w = folder / "adapter_model.safetensors"
            if w.is_file():
                out.setdefault(sha256_file(w), folder.resolve())
    return out


def source_of(expert: Expert) -> str:
    """Where an expert came from: a hub repository at a commit, or a folder."""
    h = expert.hub
    if h:
        return f"hub {h['repo']} revision {h['revision']} (commit {h['commit']})"
    return f"folder {expert.path}"


def describe(expert: Expert) -> dict:
    """A JSON-friendly view of an expert row."""
    keep = (
        "name", "path", "sha256", "config_sha256", "base_model", "base_config_hash", "peft_type", "rank", "ranks",
        "alpha", "use_rslora", "target_modules", "n_params", "task", "dataset", "created", "meta",
    )
    return {"source": source_of(expert), **{k: getattr(expert, k) for k in keep}}


__all__ = [
    "add_expert", "remove_expert", "verify_experts", "parse_meta", "describe", "BaseCache",
    "AdapterError",
]
