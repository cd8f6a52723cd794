"""From a spec to examples: load the source with ``datasets``, filter, render, dedupe, split.

Splits are deterministic: after de-duplicating on the example's raw text (first
occurrence wins), every example is placed by ``sha256(seed, text)``, so the same data
and seed always give the same splits, whatever the file order. Test is disjoint from
train and validation (no shared text), and validation from train. A spec's
``split.disjoint_from`` names built-in tasks whose train and validation texts are then
dropped from its test split too (a held-out task over the same words or file as experts).
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import Any

from recycle.data import Example
from recycle.errors import RecycleError
from recycle.tasks.spec import SPLITS, TaskSpec

_MEMO: dict[str, dict[str, list[Example]]] = {}


# ---- loading -------------------------------------------------------------------------

def _datasets_cache() -> str:
    from recycle.basemodels import cache_dir

    return str(cache_dir() / "datasets")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _check_local(files: Any) -> None:
    items = files.values() if isinstance(files, dict) else [files]
    for item in items:
        for f in item if isinstance(item, list) else [item]:
            if "://" in f:
                continue
            if glob.has_magic(f):
                found = glob.glob(f)
                if not found:
                    raise RecycleError(f"no data file matches {f}")
            elif not Path(f).exists():
                raise RecycleError(f"data file {f} does not exist")
            else:
                found = [f]
            for one in found:  # datasets reports an empty file as "StopIteration" or a generic failure
                if Path(one).is_file() and _blank_file(Path(one)):
                    raise RecycleError(f"data file {one} is empty")


def _blank_file(path: Path) -> bool:
    """Nothing but white space in the file (read until the first other byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def local_paths(spec: TaskSpec) -> list[Path]:
    """The local files a spec reads (for change detection)."""
    src, out = spec.source, []
    files = src.get("data_files")
    if files is not None:
        items = files.values() if isinstance(files, dict) else [files]
        for item in items:
            out += [Path(f) for f in (item if isinstance(item, list) else [item]) if "://" not in f]
    if "file" in src and "package" not in src:
        out.append(Path(src["file"]))
    if "disk" in src:
        out.append(Path(src["disk"]))
    return out


def load_source(spec: TaskSpec) -> dict[str, list[dict]]:
    """``{source split name: rows}`` as plain dicts."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a failed load is our one line, not its log
    src = spec.source
    options = dict(src.get("options") or {})
    try:
        if "preparer" in src:
            from recycle.tasks.preparers import prepare

            path = _asset(src) if "package" in src else Path(src["file"])
            jsonl = prepare(src["preparer"], path, options)
            ds = datasets.load_dataset("json", data_files=str(jsonl), cache_dir=_datasets_cache())
        elif "builder" in src:
            files = str(_asset(src)) if "package" in src else src["data_files"]
            _check_local(files)
            ds = datasets.load_dataset(
                src["builder"], data_files=files, cache_dir=_datasets_cache(), **options
            )
        elif "disk" in src:
            if not Path(src["disk"]).is_dir():
                raise RecycleError(f"save_to_disk folder {src['disk']} does not exist")
            ds = datasets.load_from_disk(src["disk"])
        else:
            _hub_reachable(src["hub"], src.get("revision"))
            ds = datasets.load_dataset(
                src["hub"], src.get("config"), revision=src.get("revision"), **options
            )
    except RecycleError:
        raise
    except Exception as e:  # datasets raises many kinds; the user needs one line
        raise RecycleError(f"task {spec.name}: cannot load {spec.describe_source()}: {_one_line(e)}") from None
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    if "split" in src:
        if src["split"] not in ds:
            raise RecycleError(
                f"task {spec.name}: source has no split {src['split']!r} (has {', '.join(ds)})"
            )
        ds = datasets.DatasetDict({src["split"]: ds[src["split"]]})
    return {name: part.to_list() for name, part in ds.items()}


def _hub_reachable(name: str, revision: str | None) -> None:
    """Fail at once, in one line, where a hub data set cannot be had: offline
    (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) ``datasets`` reads its cache only; online,
    one bounded request first, instead of ``datasets``' retries."""
    import os

    from recycle import hub

    if hub.offline() or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().dataset_info(name, revision=revision, timeout=hub.TIMEOUT)
    except RevisionNotFoundError:
        raise RecycleError(f"data set {name} has no revision {revision!r} on the hub") from None
    except RepositoryNotFoundError:
        raise RecycleError(f"no data set {name} on the hub (or it is private or gated)") from None
    except (HfHubHTTPError, OSError) as e:
        raise RecycleError(f"cannot reach the hub for data set {name} ({' '.join(str(e).split())[:120]}); "
                           "set HF_HUB_OFFLINE=1 to use the local cache") from None


def _asset(src: dict) -> Path:
    from recycle.tasks.assets import package_path

    return package_path(src["package"], src["file"])


# ---- rendering -----------------------------------------------------------------------

def cap(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text[: max_chars - 3]
    space = cut.rfind(" ")
    if space > max_chars * 0.7:
        cut = cut[:space]
    return cut.rstrip() + "..."


def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _value(spec: TaskSpec, row: dict, field: str, where: str):
    v = row.get(field)
    if v is None or (isinstance(v, str) and not v.strip()):
        raise RecycleError(f"task {spec.name}: {where} has no value for field {field!r}")
    return v


def _label_index(spec: TaskSpec, value: Any, choices: list[str], where: str) -> int:
    if spec.label_values is not None:
        for i, vals in enumerate(spec.label_values):
            if str(value) in vals:
                return i
        raise RecycleError(
            f"task {spec.name}: {where} has label {value!r}, not one of label_values "
            f"{[v[0] if len(v) == 1 else v for v in spec.label_values]}"
        )
    if isinstance(value, bool):
        raise RecycleError(f"task {spec.name}: {where} has a boolean label; use label_values")
    if isinstance(value, int):
        if 0 <= value < len(choices):
            return value
        raise RecycleError(
            f"task {spec.name}: {where} has label {value}, outside the {len(choices)} choices (0-{len(choices) - 1})"
        )
    if isinstance(value, str):
        if value in choices:
            return choices.index(value)
        low = [c.strip().lower() for c in choices]
        if value.strip().lower() in low:
            return low.index(value.strip().lower())
        raise RecycleError(
            f"task {spec.name}: {where} has label {value!r}, not one of the choices {choices}"
        )
    raise RecycleError(f"task {spec.name}: {where} has a label of type {type(value).__name__}")


def render(spec: TaskSpec, row: dict, where: str = "an example") -> Example:
    values = {
        f: cap(str(_value(spec, row, f, where)), spec.max_chars) for f in spec.template_fields
    }
    prompt = spec.template.format(**values)
    text = cap(str(_value(spec, row, spec.input_field, where)), spec.max_chars)
    if spec.target_field:
        target = str(_value(spec, row, spec.target_field, where))
        answer = target if target[:1].isspace() else spec.target_prefix + target
        return Example(prompt=prompt, choices=None, answer=answer, label=None, text=text)
    if spec.choices is not None:
        choices = list(spec.choices)
    else:
        choices = _value(spec, row, spec.choices_field, where)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise RecycleError(
                f"task {spec.name}: {where}: field {spec.choices_field!r} must hold a list of at least 2 strings"
            )
    label = _label_index(spec, _value(spec, row, spec.label_field, where), choices, where)
    return Example(prompt=prompt, choices=choices, answer=choices[label], label=label, text=text)


# ---- splitting -----------------------------------------------------------------------

def _key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\0{text}".encode()).hexdigest()


def _dedupe_key(ex: Example) -> str:
    return " ".join(ex.text.split()).lower()


def _render_all(spec: TaskSpec, rows: list[dict], split_name: str) -> list[Example]:
    out, seen = [], set()
    for i, row in enumerate(rows):
        if spec.filter and any(str(row.get(f)) not in vals for f, vals in spec.filter.items()):
            continue
        if any(_blank(row.get(f)) for f in spec.template_fields + [spec.input_field]):
            continue  # no text to show: not an example
        ex = render(spec, row, f"example {i + 1} of source split {split_name!r}")
        k = _dedupe_key(ex)
        if k in seen:
            continue
        seen.add(k)
        out.append(ex)
    return out


def _check_fields(spec: TaskSpec, data: dict[str, list[dict]]) -> None:
    columns: set[str] = set()
    for rows in data.values():
        if rows:
            columns |= set(rows[0])
    if not columns:
        raise RecycleError(f"task {spec.name}: the source has no examples")
    have = ", ".join(sorted(columns))
    for f in spec.template_fields:
        if f not in columns:
            raise RecycleError(f"task {spec.name}: template names field {{{f}}} the data lacks (fields: {have})")
    for key in ("text_field", "label_field", "choices_field", "target_field"):
        f = getattr(spec, key)
        if f and f not in columns:
            raise RecycleError(f"task {spec.name}: {key} {f!r} is not a field of the data (fields: {have})")
    for f in spec.filter or {}:
        if f not in columns:
            raise RecycleError(f"task {spec.name}: filter field {f!r} is not a field of the data (fields: {have})")


def build_splits(spec: TaskSpec) -> dict[str, list[Example]]:
    """All three splits of a task, memoised per process (keyed on spec and file stamps)."""
    memo_key = spec.to_json() + json.dumps(_stamps(spec))
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    data = load_source(spec)
    _check_fields(spec, data)
    seed = spec.split.get("seed", 0)
    if "named" in spec.split:
        named = spec.split["named"]
        for ours, theirs in named.items():
            if theirs not in data:
                raise RecycleError(
                    f"task {spec.name}: split {ours} names source split {theirs!r}, which does not exist "
                    f"(has {', '.join(data)})"
                )
        test = _render_all(spec, data[named["test"]], named["test"])
        taken = {_dedupe_key(e) for e in test}
        val: list[Example] = []
        if "validation" in named:
            val = [e for e in _render_all(spec, data[named["validation"]], named["validation"])
                   if _dedupe_key(e) not in taken]
            taken |= {_dedupe_key(e) for e in val}
        train = [e for e in _render_all(spec, data[named["train"]], named["train"])
                 if _dedupe_key(e) not in taken]
        train.sort(key=lambda e: _key(seed, _dedupe_key(e)))
        if "validation" not in named:
            n_val = round(len(train) * spec.split.get("validation_fraction", 0.0))
            val, train = train[:n_val], train[n_val:]
        test.sort(key=lambda e: _key(seed, _dedupe_key(e)))
        val.sort(key=lambda e: _key(seed, _dedupe_key(e)))
        splits = {"train": train, "validation": val, "test": test}
        want_val = "validation" in named or spec.split.get("validation_fraction", 0.0) > 0
    else:
        rows = [r for name in sorted(data) for r in data[name]]
        every = _render_all(spec, rows, "+".join(sorted(data)))
        every.sort(key=lambda e: _key(seed, _dedupe_key(e)))
        n = len(every)
        n_test = round(n * spec.split["test"])
        n_val = round(n * spec.split["validation"])
        n_train = min(round(n * spec.split["train"]), n - n_test - n_val)
        splits = {
            "test": every[:n_test],
            "validation": every[n_test:n_test + n_val],
            "train": every[n_test + n_val:n_test + n_val + n_train],
        }
        want_val = spec.split["validation"] > 0
    for name in SPLITS:
        if not splits[name] and (name != "validation" or want_val):
            total = sum(len(v) for v in splits.values())
            raise RecycleError(
                f"task {spec.name}: split {name!r} is empty ({total} examples after filtering and de-duplication)"
            )
    if spec.split.get("disjoint_from"):
        taken = _trained_texts(spec)
        splits["test"] = [e for e in splits["test"] if _dedupe_key(e) not in taken]
        if not splits["test"]:
            raise RecycleError(f"task {spec.name}: no test example is left after split.disjoint_from")
    splits = {k: splits[k] for k in SPLITS}
    _MEMO[memo_key] = splits
    return splits


def _trained_texts(spec: TaskSpec) -> set[str]:
    """The train and validation texts of the built-in tasks ``split.disjoint_from`` names."""
    from recycle.tasks.catalogue import catalogue_spec

    out: set[str] = set()
    for name in spec.split["disjoint_from"]:
        if name == spec.name:
            raise RecycleError(f"task {spec.name}: split.disjoint_from names the task itself")
        other = catalogue_spec(name)
        if other.split.get("disjoint_from"):
            raise RecycleError(f"task {spec.name}: split.disjoint_from names {name}, which has a "
                               "disjoint_from of its own (one level only)")
        parts = build_splits(other)
        out |= {_dedupe_key(e) for e in parts["train"] + parts["validation"]}
    return out


def _stamps(spec: TaskSpec) -> list:
    out = []
    for p in local_paths(spec):
        try:
            st = p.stat()
            out.append([str(p), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(p), None, None])
    return out
