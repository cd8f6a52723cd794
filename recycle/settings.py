"""Settings: frozen dataclasses, checked when built, hashed into result keys.

Every group of settings a user gives (a method's, gate training's, expert training's) is a
:class:`Settings` subclass: its fields are typed and carry a help text (:func:`setting`),
``__post_init__`` refuses bad values in one line, :meth:`Settings.from_dict` refuses
unknown keys and wrong types (from a pipeline file or the command line) before anything
runs, and :attr:`Settings.hash` identifies what was computed with them.
"""

from __future__ import annotations

import hashlib
import math
import json
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from recycle.errors import RecycleError


def setting(default, help: str, *, minimum=None, positive: bool = False, below=None, choices=None):
    """A settings field with its help text (shown by ``recycle compose --help``) and its
    bounds, checked by :class:`Settings` when it is built: ``minimum`` (inclusive),
    ``positive`` (> 0), ``below`` (exclusive), ``choices``."""
    return field(default=default, metadata={"help": help, "minimum": minimum, "positive": positive,
                                            "below": below, "choices": choices})


@dataclass(frozen=True)
class Settings:
    """No settings. Subclasses add fields (with :func:`setting`, bounds declared there) and
    check anything else in ``__post_init__`` (calling this one first)."""

    def __post_init__(self):
        for f in fields(self):
            m, value = f.metadata, getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if value is None or not m:
                continue
            if m.get("choices") is not None and value not in m["choices"]:
                raise RecycleError(f"{flag} must be {' or '.join(map(str, m['choices']))}, not {value!r}")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            low, high = m.get("minimum"), m.get("below")
            if m.get("positive") and not value > 0:
                raise RecycleError(f"{flag} must be positive, not {value}")
            if low is not None and high is not None and not low <= value < high:
                raise RecycleError(f"{flag} must be in [{low:g}, {high:g}), not {value}")
            if low is not None and high is None and not value >= low:
                raise RecycleError(f"{flag} must be {'0 or more' if low == 0 else f'at least {low}'}, not {value}")
            if isinstance(value, float) and not math.isfinite(value):  # as from_dict's type check says
                raise RecycleError(f"{flag} must be a finite number, not {value}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str) -> Settings:
        """Build from a mapping (a pipeline table, stored JSON, parsed options); ``where``
        names the owner in messages."""
        if not isinstance(values, Mapping):
            raise RecycleError(f"{where}: settings must be a table")
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            allowed = ", ".join(f"--{n.replace('_', '-')}" for n in cls.names()) or "none"
            raise RecycleError(f"{where} takes no setting --{unknown[0].replace('_', '-')} (its settings: {allowed})")
        for f in fields(cls):
            if f.name in values:
                _check_type(where, f, values[f.name])
        try:
            return cls(**values)
        except TypeError as e:
            raise RecycleError(f"{where}: {e}") from None

    @classmethod
    def describe(cls) -> list[dict]:
        """Each field: name, type, default, help (for CLI help and the README)."""
        out = []
        for f in fields(cls):
            default = None if f.default is MISSING else f.default
            out.append({"name": f.name, "type": _type_name(f), "default": default, "help": f.metadata.get("help", "")})
        return out


def _type_name(f) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return t.replace(" | None", "").replace("Optional[", "").rstrip("]")


def _check_type(where: str, f, value) -> None:
    want = _type_name(f)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
                 and value not in (float("inf"), float("-inf")),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }.get(want, True)
    if value is None and "None" in str(f.type):
        ok = True
    if not ok:
        raise RecycleError(f"{where}: --{f.name.replace('_', '-')} must be {want.replace('list[str]', 'a list of names')}, "
                           f"not {value!r}")


def parse_cli_settings(settings_cls: type[Settings], method: str, args: Sequence[str]) -> dict:
    """``--name VALUE`` / ``--flag`` / ``--no-flag`` arguments into a dict of the method's
    settings fields, typed by their declared types."""
    by_flag = {n.replace("_", "-"): f for f in fields(settings_cls) for n in [f.name]}
    out: dict[str, Any] = {}
    i = 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise RecycleError(f"unexpected argument {arg!r}")
        name, eq, inline = arg[2:].partition("=")
        negate = name.startswith("no-") and name[3:] in by_flag and _type_name(by_flag[name[3:]]) == "bool"
        f = by_flag.get(name[3:] if negate else name)
        if f is None:
            allowed = ", ".join(f"--{n}" for n in by_flag) or "none"
            raise RecycleError(f"{method} takes no option --{name} (its settings: {allowed})")
        kind = _type_name(f)
        if kind == "bool":
            if eq:
                raise RecycleError(f"--{name} is a flag: give --{f.name.replace('_', '-')} or --no-{f.name.replace('_', '-')}")
            out[f.name] = not negate
            i += 1
            continue
        if eq:
            raw = inline
            i += 1
        else:
            if i + 1 >= len(args):
                raise RecycleError(f"--{name} needs a value")
            raw, i = args[i + 1], i + 2
        try:
            out[f.name] = {"int": int, "float": float}.get(kind, str)(raw)
        except ValueError:
            raise RecycleError(f"--{name} must be {kind}, not {raw!r}") from None
    return out
