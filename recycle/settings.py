"""Settings: frozen dataclasses, checked when built, hashed into result keys, and the one
place every option is declared.

Every group of settings a user gives (a method's, gate training's, expert training's, the
resources a Ray task asks for) is a :class:`Settings` subclass: its fields are typed and
carry a help text and bounds (:func:`setting`), ``__post_init__`` refuses bad values in one
line, :meth:`Settings.from_dict` refuses unknown keys and wrong types (from a pipeline file
or the command line) before anything runs, and :attr:`Settings.hash` identifies what was
computed with them. :func:`options` turns a group into a command's Typer options (help,
default, bounds, choices from the fields), so no option is declared twice.

This module imports neither torch nor Ray: every command's options are built from it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import json
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Annotated, Any, Optional

from recycle.errors import RecycleError


_ALWAYS = object()  # a setting kept in to_dict whatever its value


def setting(default, help: str, *, minimum=None, positive: bool = False, below=None, maximum=None, choices=None,
            omit=_ALWAYS):
    """A settings field with its help text (shown by ``--help``) and its bounds, checked by
    :class:`Settings` when it is built: ``minimum`` and ``maximum`` (inclusive), ``positive``
    (> 0), ``below`` (exclusive), ``choices``. Numbers must be finite. ``omit``: a value at
    which the setting is left out of :meth:`Settings.to_dict` (and so of hashes and result
    keys): for an option added later, the behaviour before it, so that what was stored before
    it keeps its key."""
    return field(default=default, metadata={"help": help, "minimum": minimum, "positive": positive,
                                            "below": below, "maximum": maximum, "choices": choices, "omit": omit})


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_value(flag: str, value, m: Mapping) -> None:
    """``value`` against a field's bounds (:func:`setting`), one line naming ``flag``."""
    if value is None:
        return
    if m.get("choices") is not None and value not in m["choices"]:
        raise RecycleError(f"{flag} must be {' or '.join(map(str, m['choices']))}, not {value!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    low, high, top = m.get("minimum"), m.get("below"), m.get("maximum")
    if m.get("positive") and not value > 0:
        raise RecycleError(f"{flag} must be positive, not {value}")
    if low is not None and high is not None and not low <= value < high:
        raise RecycleError(f"{flag} must be in [{low:g}, {high:g}), not {value}")
    if low is not None and top is not None and not low <= value <= top:
        raise RecycleError(f"{flag} must be from {low:g} to {top:g}, not {value}")
    if low is not None and high is None and not value >= low:
        raise RecycleError(f"{flag} must be {'0 or more' if low == 0 else f'at least {low}'}, not {value}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecycleError(f"{flag} must be a finite number, not {value}")


def bounded(**bounds):
    """A Typer ``callback`` checking a lone numeric option (one not in a settings group)
    with :func:`setting`'s bounds, before the command runs: ``typer.Option(callback=
    bounded(minimum=1))``. The message names the option as typed."""
    meta = {"minimum": None, "positive": False, "below": None, "maximum": None, "choices": None, **bounds}

    def callback(ctx, param, value):
        if not ctx.resilient_parsing:
            check_value(param.opts[0], value, meta)
        return value

    return callback


@dataclass(frozen=True)
class Settings:
    """No settings. Subclasses add fields (with :func:`setting`, bounds declared there) and
    check anything else in ``__post_init__`` (calling this one first)."""

    def __post_init__(self):
        for f in fields(self):
            check_value(flag_of(f.name), getattr(self, f.name), f.metadata)

    def to_dict(self) -> dict:
        d = asdict(self)
        for f in fields(self):
            omit = f.metadata.get("omit", _ALWAYS)
            if omit is not _ALWAYS and d[f.name] == omit:
                del d[f.name]
        return d

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str, *, flags: Mapping[str, str] | None = None,
                  typed: bool = False) -> Settings:
        """Build from a mapping (a pipeline table, stored JSON, parsed options: ``typed``);
        ``where`` names the owner in messages, ``flags`` maps a field to the option its user
        typed (``{"lr": "--gate-lr"}``: a bad value is reported so)."""
        flags = {f: flags.get(f, flag_of(f)) for f in cls.names()} if flags else {f: flag_of(f) for f in cls.names()}
        if not isinstance(values, Mapping):
            raise RecycleError(f"{where}: settings must be a table")
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            allowed = ", ".join(flags.values()) or "none"
            raise RecycleError(f"{where} takes no setting {flag_of(unknown[0])} (its settings: {allowed})")
        for f in fields(cls):
            if f.name in values:
                flag = flags[f.name]
                if not typed:
                    _check_type(where, f, values[f.name], flag)
                check_value(flag, values[f.name], f.metadata)
        try:
            return cls(**values)
        except TypeError as e:
            raise RecycleError(f"{where + ': ' if where else ''}{e}") from None

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
    t = t.replace(" | None", "")
    return t[len("Optional["):-1] if t.startswith("Optional[") else t


def _check_type(where: str, f, value, flag: str | None = None) -> None:
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
        want = want.replace("list[str]", "a list of names") + (" (a finite number)" if want == "float" else "")
        raise RecycleError(f"{where + ': ' if where else ''}{flag or flag_of(f.name)} must be {want}, not {value!r}")


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


# ---- Typer options from settings fields ------------------------------------------------


def options(param: str, cls: type[Settings], *, prefix: str = "", names: Mapping[str, str] | None = None,
            flags: Mapping[str, str] | None = None, exclude: Sequence[str] = (), optional: bool | str = False,
            help: Mapping[str, str] | None = None, about: str = ""):
    """Decorator of a Typer command: its parameter ``param`` becomes one option per field of
    ``cls`` (``--{prefix}{field}``, or ``--{names[field]}``, or ``flags[field]`` as declared),
    with the field's help, default and choices, and the command receives ``cls`` built from
    them (the bounds checked by the dataclass, the message naming the option as typed). A
    field of type ``list[str]`` is a comma-separated option. ``optional``: every option defaults to unset, and the command
    receives None when none is given (the field's default is shown in the help); a field's
    name: the group is given by giving that option, the others need it. ``help`` overrides
    a field's help text for this command, ``about`` is added to every other; ``exclude``
    leaves fields out (the command gives them)."""
    import typer  # the settings classes themselves need no CLI

    names, flags, help = dict(names or {}), dict(flags or {}), dict(help or {})

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        generated, fields_of = [], {}
        for f in fields(cls):
            if f.name in exclude:
                continue
            pname = names.setdefault(f.name, prefix + f.name)
            flag = flags.setdefault(f.name, flag_of(pname))
            fields_of[pname] = f.name
            generated.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY,
                                               **_option(f, flag, bool(optional), help.get(f.name), about, typer,
                                                        show=f.name != optional)))
        params = []
        for p in sig.parameters.values():
            if p.name == param:
                params.extend(generated)
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(fn)
        def command(**kwargs):
            given = {fields_of[k]: kwargs.pop(k) for k in list(kwargs) if k in fields_of}
            given = {k: v for k, v in given.items() if v is not None or not optional}
            if isinstance(optional, str) and given and optional not in given:
                raise RecycleError(f"{flags[next(iter(given))]} needs {flags[optional]}")
            for f in fields(cls):
                if _type_name(f) == "list[str]" and isinstance(given.get(f.name), str):
                    given[f.name] = [x.strip() for x in given[f.name].split(",") if x.strip()] or None
            kwargs[param] = None if optional and not given else cls.from_dict(given, "", flags=flags, typed=True)
            return fn(**kwargs)

        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def _option(f, flag: str, optional: bool, help_text: str | None, about: str, typer, show: bool) -> dict:
    kind = _type_name(f)
    typ = {"int": int, "float": float, "bool": bool}.get(kind, str)
    text = help_text or f.metadata.get("help", "") + about
    text = text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")
    if kind == "list[str]":
        text = "Comma-separated. " + text
    if f.metadata.get("choices"):
        text += f" One of: {', '.join(map(str, f.metadata['choices']))}."
    default = f.default
    decls = (f"{flag}/--no-{flag[2:]}",) if typ is bool else (flag,)
    if optional or default is None:
        show = False if default is None or not show else (
            ("on" if default else "off") if typ is bool else str(default))
        info = typer.Option(*decls, help=text, show_default=show)
        return {"default": None, "annotation": Annotated[Optional[typ], info]}
    return {"default": default, "annotation": Annotated[typ, typer.Option(*decls, help=text)]}


# ---- the groups every training command shares ------------------------------------------

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Precision(Settings):
    """The dtype a command's models compute in (``--dtype``), a group of its own for the
    commands that store nothing (``predict``, ``serve``) and inherited by every group that
    loads a model, so it is declared here once. ``auto`` is resolved before anything is
    keyed (:func:`recycle.cluster.resolve_dtype`): bfloat16 where the tasks get a GPU or
    the CPU has bfloat16 instructions, else float32. A float32 setting is left out of :meth:`to_dict` (so of every hash
    and key): what was stored before dtypes existed was float32 and keeps its key."""

    dtype: str = setting("float32", "dtype the base model computes in (auto: bfloat16 on a GPU or a CPU with bfloat16 "
                         "instructions, else float32); "
                         "trained parameters stay float32", choices=DTYPES, omit="float32")

    def with_dtype(self, dtype: str):
        from dataclasses import replace

        return replace(self, dtype=dtype)


@dataclass(frozen=True)
class Resources(Settings):
    """What each Ray task of a command asks for (``--cpus-per-expert`` and the like)."""

    cpus: float = setting(1.0, "CPUs per Ray task (also its torch threads)", positive=True)
    gpus: float | None = setting(None, "GPUs per Ray task, fractions allowed (default: 1 if the cluster has GPUs, "
                                       "else 0)", minimum=0)


GATES_ALGORITHM = "phatgoose-gates/1"


@dataclass(frozen=True)
class GateSettings(Precision):
    """What decides a PHATGOOSE gate file's content (with the adapter and the data)."""

    steps: int = setting(100, "training steps per expert", minimum=1)
    lr: float = setting(5e-3, "AdamW learning rate", positive=True)
    batch_size: int = setting(8, "examples per step", minimum=1)
    max_length: int = setting(256, "tokens per example (prompt cut from the left)", minimum=2)
    warmup: float = setting(0.06, "fraction of steps of linear warm-up", minimum=0, below=1)
    seed: int = setting(0, "seed of the batch order")
    weight_decay: float = setting(0.0, "AdamW weight decay", minimum=0)

    def to_dict(self) -> dict:
        return {"algorithm": GATES_ALGORITHM, **super().to_dict()}

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup * self.steps))


@dataclass(frozen=True)
class TrainSettings(Precision):
    """A LoRA expert's training (``train-expert``, a pipeline's ``[train]``)."""

    rank: int = setting(8, "LoRA rank r", minimum=1)
    alpha: float = setting(16.0, "LoRA alpha", positive=True)
    targets: list[str] | None = setting(None, "module names (default: the q,k,v,o,gate,up,down projections the base "
                                              "has)")
    layers: str | None = setting(None, "layers to adapt: 'top8', '22-29' or '0,3,5' (default all)")
    steps: int = setting(100, "optimiser steps", minimum=1)
    lr: float = setting(1e-3, "peak learning rate (AdamW)", positive=True)
    batch_size: int = setting(8, "examples per step", minimum=1)
    max_length: int = setting(128, "tokens per example (prompt cut from the left)", minimum=8)
    warmup: float = setting(0.06, "warm-up, as a fraction of the steps", minimum=0, below=1)
    seed: int = setting(0, "seed for init and data order")
    weight_decay: float = setting(0.0, "AdamW weight decay", minimum=0)
    dropout: float = setting(0.0, "LoRA dropout", minimum=0, below=1)


@dataclass(frozen=True)
class RouterTrainSettings(Precision):
    """A MoE++ composition's router training (``train-router``)."""

    steps: int = setting(200, "optimiser steps", minimum=1)
    lr: float = setting(5e-3, "AdamW learning rate", positive=True)
    beta: float = setting(0.1, "weight of the balance loss", minimum=0)
    batch_size: int = setting(8, "examples per step", minimum=1)
    max_length: int = setting(128, "tokens per example (prompt cut from the left)", minimum=8)
    warmup: float = setting(0.06, "fraction of steps of linear warm-up", minimum=0, below=1)
    examples: int = setting(400, "calibration examples (spread over the members' tasks by default)", minimum=1)
    seed: int = setting(0, "seed of the sample and the batch order")
    objective: str = setting("lm", "what the router learns: the calibration answers (lm, the paper's loss) or "
                             "to keep the PHATGOOSE composition's next-token distributions (distill)",
                             choices=("lm", "distill"))


@dataclass(frozen=True)
class RouterTrainOptions(RouterTrainSettings):
    """What ``recycle train`` takes for a MoE++ composition: the settings, and where the
    calibration data comes from (identified by content in the state's key, not as given)."""

    calibration: str = setting("", "comma-separated tasks, or a JSONL file of {prompt, answer} (default: the "
                               "members' own tasks' train splits)")

    def settings(self) -> RouterTrainSettings:
        return RouterTrainSettings(**{k: getattr(self, k) for k in RouterTrainSettings.names()})


@dataclass(frozen=True)
class GateTrainSettings(Precision):
    """A COSMO composition's gate training by leaving experts out (``train-gate``)."""

    folds: int = setting(4, "folds of held-out experts (at most the number of members)", minimum=2)
    examples: int = setting(100, "validation examples per member task", minimum=1)
    seed: int = setting(0, "seed of the folds and the sample")
    batch_size: int = setting(16, "examples per forward pass", minimum=1)
    leave_out: str = setting("experts", "what a fold holds out: experts (members at random) or families (whole task "
                             "families, so that pseudo-unseen tasks are as far from the seen ones as a new family)",
                             choices=("experts", "families"), omit="experts")


@dataclass(frozen=True)
class EvalSettings(Precision):
    """What an evaluation runs on (``eval``, a pipeline's ``[[evaluations]]``)."""

    tasks: str = setting("held-out", "held-out, held-in, all, or comma-separated task names")
    n: int | None = setting(None, "test examples per task (seeded sample; default all)", minimum=1)
    n_held_in: int | None = setting(None, "test examples per held-in task (default: as -n): a large library's "
                                    "held-in tasks can take a smaller sample than the held-out ones", minimum=1,
                                    omit=None)
    seed: int = setting(0, "seed of the example sample")
    top_k: int | None = setting(None, "experts per token for token-routed methods (default 2)", minimum=1)
    batch_size: int = setting(16, "examples per forward pass", minimum=1)
    split: str = setting("test", "which split of each task: test, or validation (to choose settings without "
                         "touching the test examples; COSMO's gate is trained on the members' validation "
                         "examples, so its held-in validation scores are not clean)", choices=("test", "validation"),
                         omit="test")
