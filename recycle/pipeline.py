"""Pipelines: a TOML file of steps (tasks, experts, gates, compositions, their training,
evaluations) run in order by ``recycle run FILE``, each step skipped when its result is
already in the registry, so a pipeline resumes where a crash or Ctrl-C left it. Every step
calls the same library functions as the command a user types (``add-task``,
``train-expert``, ``add-expert``, ``train-gates``, ``compose``, ``train``, ``eval``), with
the same checks; values from the file are never turned into command lines.

::

    name = "demo"
    base = "smollm2-135m"
    dtype = "bfloat16"            # optional: every table's default (any table may give its own)

    [tasks]
    catalogue = ["vader_tweets", "trec_coarse"]   # built-in task specs
    specs = ["my_task.toml"]                      # user specs, relative to this file

    [train]                       # defaults for every trained expert (train-expert options)
    cpus_per_task = 1             # experts train as Ray tasks, in parallel where there is room
    rank = 8
    layers = "top8"
    steps = 80

    [[experts]]                   # train-expert --task (or multitask = [...], or adapter = "dir")
    task = "vader_tweets"

    [gates]                       # train-gates options, for every expert; an expert trained
    steps = 40                    # here gets them in its own Ray task, right after it

    [[compositions]]             # any of the method's settings (recycle compose --help)
    name = "pg"
    method = "phatgoose"
    top_k = 2

    [[training]]                  # recycle train NAME: what a composition's method learns (MoE++'s
    composition = "moe"           # router, COSMO's gate); any of its training settings
    steps = 200                   # (recycle train --help), and cpus / gpus per task

    [[evaluations]]
    methods = ["base", "uniform", "arrow", "phatgoose"]
    tasks = "held-out"
    n = 100
    output = "results/demo"       # optional: JSON + Markdown table + routing plot
"""

from __future__ import annotations

import os
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from recycle import methods
from recycle.console import Reporter
from recycle.errors import RecycleError
from recycle.names import check_name
from recycle.settings import EvalSettings, GateSettings, Precision, Resources, Settings, TrainSettings

# The keys of each table: its settings' fields (recycle/settings.py), plus what names things.
TASK_RESOURCES = {"cpus": "cpus_per_task", "gpus": "gpus_per_task"}
EXPERT_RESOURCES = {"cpus": "cpus_per_expert", "gpus": "gpus_per_expert"}
TRAINING_RESOURCES = {"cpus": "cpus", "gpus": "gpus"}  # per Ray task, as `recycle train` names them
TOP_KEYS = {"name", "description", "base", "tasks", "train", "experts", "gates", "compositions", "training",
            "evaluations", *Precision.names()}  # a top-level dtype: every step's default
TRAIN_KEYS = set(TrainSettings.names())
EXPERT_KEYS = TRAIN_KEYS | {"task", "multitask", "name", "adapter", "dataset"}
GATE_KEYS = set(GateSettings.names()) | set(EXPERT_RESOURCES.values())
COMPOSITION_KEYS = {"name", "method", "experts"}  # plus the method's own settings
TRAINING_KEYS = {"composition"} | set(TRAINING_RESOURCES.values())  # plus its method's training settings
EVAL_KEYS = set(EvalSettings.names()) | set(TASK_RESOURCES.values()) | {"methods", "compositions", "output",
                                                                         "plot_method"}


@dataclass
class Pipeline:
    path: Path
    name: str
    base: str
    tasks_catalogue: list[str] = field(default_factory=list)
    task_specs: list[Path] = field(default_factory=list)
    train: dict = field(default_factory=dict)
    experts: list[dict] = field(default_factory=list)
    gates: dict | None = None
    cpus_per_task: float = 1.0  # per expert being trained
    gpus_per_task: float | None = None
    gate_resources: Resources = field(default_factory=Resources)
    compositions: list[dict] = field(default_factory=list)
    training: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)


def _bad(path: Path, msg: str) -> RecycleError:
    return RecycleError(f"{path}: {msg}")


def _check_keys(path, where: str, table, allowed: set) -> None:
    if not isinstance(table, dict):
        raise _bad(path, f"[{where}] must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _bad(path, f"unknown key(s) in [{where}]: {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def load(path: str | Path, precision: Precision | None = None) -> Pipeline:
    """Parse and check a whole pipeline file before anything runs: every key, every value's
    type and range (by the settings it becomes), every name, the task specs, and that every
    output's folder is writable. Every problem is one line naming the file and the key.
    ``precision`` (``recycle run --dtype``) replaces the file's top-level ``dtype``."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RecycleError(f"pipeline file {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise _bad(path, f"not valid TOML ({e})") from None
    _check_keys(path, "top level", raw, TOP_KEYS)
    if precision is not None:
        raw.update(precision.to_dict() or {"dtype": precision.dtype})
    for key in ("tasks", "train", "gates"):
        if key in raw and not isinstance(raw[key], dict):
            raise _bad(path, f"[{key}] must be a table")
    if not isinstance(raw.get("name"), str) or not raw["name"].strip():
        raise _bad(path, "needs name = \"...\"")
    if not isinstance(raw.get("base"), str):
        raise _bad(path, "needs base = \"...\" (an alias such as smollm2-135m, a folder or a hub id)")
    if not isinstance(raw.get("description", ""), str):
        raise _bad(path, "description must be a string")
    _defaults(path, raw)
    p = Pipeline(path=path.resolve(), name=raw["name"], base=raw["base"])
    tasks = raw.get("tasks", {})
    _check_keys(path, "tasks", tasks, {"catalogue", "specs"})
    p.tasks_catalogue = _str_list(path, "tasks.catalogue", tasks.get("catalogue", []))
    p.task_specs = [(path.parent / s).resolve() for s in _str_list(path, "tasks.specs", tasks.get("specs", []))]
    p.tasks_catalogue = [_named(path, "tasks.catalogue", "task", t) for t in p.tasks_catalogue]
    _checked(path, "[tasks]", lambda: _load_specs(p))
    p.train = _train_values(path, "train", raw.get("train", {}))
    _check_keys(path, "train", p.train, TRAIN_KEYS | set(TASK_RESOURCES.values()))
    resources = _settings(path, "[train]", Resources, _take(p.train, TASK_RESOURCES), TASK_RESOURCES)
    p.cpus_per_task, p.gpus_per_task = resources.cpus, resources.gpus
    _settings(path, "[train]", TrainSettings, p.train)
    for i, e in enumerate(_table_list(path, "experts", raw.get("experts", []))):
        _check_keys(path, f"experts {i + 1}", e, EXPERT_KEYS)
        kinds = [k for k in ("task", "multitask", "adapter") if k in e]
        if len(kinds) != 1 and not (set(kinds) == {"adapter", "task"}):
            raise _bad(path, f"expert {i + 1} needs exactly one of task, multitask or adapter "
                             "(an adapter may name its task)")
        if "multitask" in e and not e.get("name"):
            raise _bad(path, f"expert {i + 1}: a multitask expert needs a name")
        for key in ("name", "task"):
            if key in e:
                _named(path, f"expert {i + 1} {key}", "expert" if key == "name" else "task", e[key])
        if "multitask" in e:
            for t in _str_list(path, f"expert {i + 1} multitask", e["multitask"]):
                _named(path, f"expert {i + 1} multitask", "task", t)
        for key in ("adapter", "dataset"):
            if key in e and not isinstance(e[key], str):
                raise _bad(path, f"expert {i + 1}: {key} must be a string")
        e = _train_values(path, f"experts {i + 1}", e)
        own = {k: v for k, v in e.items() if k in TRAIN_KEYS}
        if "adapter" in e and own:
            raise _bad(path, f"expert {i + 1}: an adapter is not trained here, so {sorted(own)[0]} does not apply")
        _settings(path, f"[[experts]] {i + 1}", TrainSettings, {**p.train, **own})
        p.experts.append(e)
    if "gates" in raw:
        _check_keys(path, "gates", raw["gates"], GATE_KEYS)
        p.gates = dict(raw["gates"])
        p.gate_resources = _settings(path, "[gates]", Resources, _take(p.gates, EXPERT_RESOURCES), EXPERT_RESOURCES)
        _settings(path, "[gates]", GateSettings, p.gates)
    for i, c in enumerate(_table_list(path, "compositions", raw.get("compositions", []))):
        if not isinstance(c.get("name"), str) or not isinstance(c.get("method"), str):
            raise _bad(path, f"composition {i + 1} needs name and method")
        _named(path, f"composition {i + 1}", "composition", c["name"])
        try:
            m, _ = methods.parse(c["method"])
        except RecycleError as e:
            raise _bad(path, f"composition {i + 1}: {e}") from None
        _check_keys(path, f"compositions {i + 1}", c, COMPOSITION_KEYS | set(m.Settings.names()))
        if "experts" in c:
            for name in _str_list(path, f"composition {i + 1} experts", c["experts"]):
                _named(path, f"composition {i + 1} experts", "expert", name)
        _settings(path, f"[[compositions]] {i + 1}", m.Settings,
                  {k: v for k, v in c.items() if k not in COMPOSITION_KEYS})
        p.compositions.append(c)
    composed = {c["name"]: c["method"] for c in p.compositions}
    for i, t in enumerate(_table_list(path, "training", raw.get("training", []))):
        p.training.append(_training(path, i + 1, t, composed))
    for i, ev in enumerate(_table_list(path, "evaluations", raw.get("evaluations", []))):
        where = f"[[evaluations]] {i + 1}"
        _check_keys(path, f"evaluations {i + 1}", ev, EVAL_KEYS)
        if not ev.get("methods") and not ev.get("compositions"):
            raise _bad(path, f"evaluation {i + 1} needs methods or compositions")
        for key in ("methods", "compositions"):
            if key in ev:
                _str_list(path, f"evaluation {i + 1} {key}", ev[key])
        for name in ev.get("compositions", []):
            _named(path, f"evaluation {i + 1} compositions", "composition", name)
        try:
            for spec in ev.get("methods", []):
                methods.parse(spec)
        except RecycleError as e:
            raise _bad(path, f"evaluation {i + 1}: {e}") from None
        _settings(path, where, EvalSettings, {k: v for k, v in ev.items() if k in EvalSettings.names()})
        _settings(path, where, Resources, _take(dict(ev), TASK_RESOURCES), TASK_RESOURCES)
        for key in ("output", "plot_method"):
            if key in ev and (not isinstance(ev[key], str) or not ev[key].strip()):
                raise _bad(path, f"{where}: {key} must be a non-empty string, not {ev[key]!r}")
        if "output" in ev:
            _writable_folder(path, f"{where} output", output_target(ev["output"]).parent)
        p.evaluations.append(ev)
    return p


def _defaults(path, raw: dict) -> None:
    """The top level's :class:`Precision` keys (``dtype``) as the default of every table
    that loads a model: ``[train]``, ``[gates]``, each ``[[training]]`` and ``[[evaluations]]``."""
    given = {k: raw.pop(k) for k in Precision.names() if k in raw}
    if not given:
        return
    _settings(path, "top level", Precision, given)
    raw.setdefault("train", {})
    for table in [raw["train"], raw.get("gates")] + list(raw.get("training") or []) + list(raw.get("evaluations") or []):
        if isinstance(table, dict):
            for k, v in given.items():
                table.setdefault(k, v)


def _training(path, i: int, t: dict, composed: dict[str, str]) -> dict:
    """A ``[[training]]`` entry: its composition's name and its resources checked here; its
    keys and values against the method's training settings when the composition is one of
    this file's (one stored before: by :meth:`Runner.check_references`, before anything runs)."""
    if not isinstance(t.get("composition"), str):
        raise _bad(path, f"training {i} needs composition = \"NAME\"")
    _named(path, f"training {i}", "composition", t["composition"])
    _settings(path, f"[[training]] {i}", Resources, _take(dict(t), TRAINING_RESOURCES), TRAINING_RESOURCES)
    if t["composition"] in composed:
        training_settings(path, i, t, composed[t["composition"]])
    return t


def training_settings(path, i: int, t: dict, method: str) -> Settings:
    """``[[training]]`` entry ``i``'s settings for a composition of ``method``, every key and
    value checked by the method's ``TrainSettings``."""
    m, _ = methods.parse(method)
    if m.TrainSettings is None:
        raise _bad(path, f"training {i}: composition {t['composition']} is {m.name}, which trains nothing")
    _check_keys(path, f"training {i}", t, TRAINING_KEYS | set(m.TrainSettings.names()))
    return _settings(path, f"[[training]] {i}", m.TrainSettings,
                     {k: v for k, v in t.items() if k not in TRAINING_KEYS})


def output_target(output: str) -> Path:
    """An evaluation's ``output`` (relative: to the working folder)."""
    target = Path(output).expanduser()
    return target if target.is_absolute() else Path.cwd() / target


def _writable_folder(path, where: str, folder: Path) -> None:
    """``folder`` (or the nearest of its parents that exists, where it will be made) takes a
    new file; the probe is removed at once."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise _bad(path, f"{where}: {probe} is not a folder")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise _bad(path, f"{where}: cannot write in {probe} ({e.strerror or e})") from None


def _take(table: dict, keys: dict) -> dict:
    """Pop a table's resource keys (``cpus_per_task``) as :class:`Resources` fields."""
    return {field_name: table.pop(key) for field_name, key in keys.items() if key in table}


def _settings(path, where: str, cls: type[Settings], values: dict, keys: dict | None = None) -> Settings:
    """``cls`` built from a table's values, every type and bound checked by the settings
    themselves; a problem names the key as the file gives it."""
    flags = {f: (keys or {}).get(f, f) for f in cls.names()}
    try:
        return cls.from_dict(values, where, flags=flags)
    except RecycleError as e:
        raise _bad(path, str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def _load_specs(p: Pipeline) -> None:
    from recycle.tasks import catalogue_spec, load_spec_file

    for name in p.tasks_catalogue:
        catalogue_spec(name)
    for f in p.task_specs:
        load_spec_file(f)


def _train_values(path, where: str, table) -> dict:
    """A table's training options, ``targets`` as a list (TOML may give "q_proj,v_proj")."""
    if not isinstance(table, dict):
        raise _bad(path, f"[{where}] must be a table")
    if isinstance(table.get("targets"), str):
        table = {**table, "targets": [t.strip() for t in table["targets"].split(",") if t.strip()]}
    return table


def _checked(path, where: str, build) -> None:
    try:
        build()
    except RecycleError as e:
        raise _bad(path, str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def _named(path, where: str, kind: str, value) -> str:
    try:
        return check_name(kind, value)
    except RecycleError as e:
        raise _bad(path, f"{where}: {e}") from None


def _str_list(path, where, value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(path, f"{where} must be a list of strings")
    return value


def _table_list(path, where, value) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _bad(path, f"[[{where}]] must be an array of tables")
    return value


class Runner:
    """Runs a pipeline's steps in order through the library, in this process."""

    def __init__(self, pipeline: Pipeline, db: Path | None, address: str | None, report: Reporter | None = None):
        self.p, self.db, self.address = pipeline, db, address
        self.report = report or Reporter()
        self.say = self.report.say

    def run(self) -> list[dict]:
        from recycle import cluster
        from recycle.registry import Registry

        self.check_references()
        registry = Registry(self.db)
        registry.check_writable()
        p = self.p
        t0 = time.time()
        self.step("tasks", lambda: self.tasks(registry))
        outputs = []
        to_train = [e for e in p.experts if "adapter" not in e
                    and registry.expert_or_none(e.get("name") or e.get("task")) is None]
        needs_ray = p.gates is not None or p.training or p.evaluations or to_train
        ctx = cluster.connect(self.address) if needs_ray else _null()
        with ctx:
            self.step("experts", lambda: self.experts(registry))
            if p.gates is not None:
                self.step("gates", lambda: self.train_gates(registry))
            self.step("compositions", lambda: self.compose(registry))
            for i, t in enumerate(p.training):
                self.step(f"training {i + 1} ({t['composition']})", lambda t=t: self.train(registry, t))
            for i, ev in enumerate(p.evaluations):
                self.step(f"evaluation {i + 1}", lambda ev=ev: outputs.append(self.evaluate(registry, ev)))
        self.say(f"pipeline {p.name}: done in {time.time() - t0:.0f} s; registry {registry.path}")
        return outputs

    def check_references(self) -> None:
        """Every composition an evaluation or a training step names is made by the pipeline
        or stored already, and a stored one's training settings fit its method (checked
        before anything, a new registry file included, is written)."""
        from recycle.registry import Registry

        made = {c["name"] for c in self.p.compositions}
        wanted = [(f"evaluation {i + 1}", n) for i, ev in enumerate(self.p.evaluations)
                  for n in ev.get("compositions", []) if n not in made]
        trained = [(i + 1, t) for i, t in enumerate(self.p.training) if t["composition"] not in made]
        wanted += [(f"training {i}", t["composition"]) for i, t in trained]
        if not wanted:
            return
        try:
            registry = Registry(self.db, create=False)
        except RecycleError:
            registry = None  # no registry yet: nothing stored
        for where, name in wanted:
            if registry is None or registry.composition_or_none(name) is None:
                raise RecycleError(f"{self.p.path.name}: {where}: no composition {name} (neither in the "
                                   "pipeline's [[compositions]] nor in the registry)")
        for i, t in trained:
            training_settings(self.p.path, i, t, registry.composition(t["composition"])["method"])

    def step(self, name: str, fn) -> None:
        t = time.time()
        self.say(f"── {self.p.name}: {name}")
        try:
            fn()
        except RecycleError as e:
            raise RecycleError(f"{self.p.path.name}: step {name} failed: {e}; fix it and run again to resume",
                               exit_code=e.exit_code) from None
        self.say(f"   {name} done ({time.time() - t:.0f} s)")

    def tasks(self, registry) -> None:
        from recycle.tasks import add_task, catalogue_spec, load_spec_file

        specs = [catalogue_spec(n) for n in self.p.tasks_catalogue] + [load_spec_file(f) for f in self.p.task_specs]
        for spec in specs:
            row = add_task(registry, spec)
            counts = f"{row['n_train']}/{row['n_validation']}/{row['n_test']}"
            self.say(f"{row['status']}: task {row['name']} ({row['kind']}, train/validation/test {counts})")

    def experts(self, registry) -> None:
        """Adapters are added; experts not yet registered are trained as Ray tasks, in
        parallel where the cluster has room (``[train] cpus_per_task``, default 1)."""
        from recycle.experts import add_expert
        from recycle.training import plan_expert, train_experts

        jobs = []
        for e in self.p.experts:
            if "adapter" in e:
                row = add_expert(registry, (self.p.path.parent / e["adapter"]).resolve(), name=e.get("name"),
                                 task=e.get("task"), dataset=e.get("dataset"), base=self.p.base)
                self.say(f"   expert {row['name']}: {row['status']}")
                continue
            name = e.get("name") or e.get("task")
            if registry.expert_or_none(name) is not None:
                self.say(f"   expert {name}: already registered, skipped")
                continue
            values = {**self.p.train, **{k: v for k, v in e.items() if k in TRAIN_KEYS}}
            settings = TrainSettings.from_dict(values, f"expert {name}")
            tasks = e["multitask"] if "multitask" in e else [e["task"]]
            jobs.append(plan_expert(registry, tasks, self.p.base, settings, name=e.get("name"),
                                    multitask="multitask" in e))
        if jobs:
            outcomes = train_experts(registry, jobs, address=self.address, cpus_per_task=self.p.cpus_per_task,
                                     gpus_per_task=self.p.gpus_per_task, report=self.report,
                                     gates=self._gates_with_experts())
            failed = [o for o in outcomes if o["status"] == "failed"]
            if failed:
                raise RecycleError(f"{len(failed)} expert(s) failed: "
                                   + "; ".join(f"{o['name']}: {o['reason']}" for o in failed))

    def _gates_with_experts(self):
        """The [gates] settings when each trained expert's gates can train in its own task
        (the same CPUs and GPUs asked for both), else None: the gates step trains them."""
        from recycle import gates

        if self.p.gates is None:
            return None
        if (self.p.gate_resources.cpus, self.p.gate_resources.gpus) != (self.p.cpus_per_task, self.p.gpus_per_task):
            return None
        return gates.GateSettings.from_dict(self.p.gates, "[gates]")

    def train_gates(self, registry) -> None:
        from recycle import gates

        experts = [e for e in registry.experts() if not e.multitask]
        if not experts:
            raise RecycleError("[gates] given but no single-task experts to train gates for")
        settings = gates.GateSettings.from_dict(self.p.gates or {}, "[gates]")
        outcomes = gates.train(registry, experts, settings, address=self.address,
                               gpus_per_expert=self.p.gate_resources.gpus, cpus_per_expert=self.p.gate_resources.cpus,
                               report=self.report)
        failed = [o for o in outcomes if o["status"] == "failed"]
        if failed:
            raise RecycleError(f"gates failed for {len(failed)} expert(s): "
                               + "; ".join(f"{o['expert']}: {o['reason']}" for o in failed))

    def compose(self, registry) -> None:
        from recycle import compose

        for c in self.p.compositions:
            settings = {k: v for k, v in c.items() if k not in COMPOSITION_KEYS}
            row = compose.create(registry, c["name"], c["method"], c.get("experts"), settings, replace=True)
            self.say(f"   composition {row['name']}: {row['method']} over {len(row['members'])} experts "
                     f"({row.get('status', 'stored')})")

    def train(self, registry, t: dict) -> None:
        from recycle import compose

        values = dict(t)
        resources = Resources.from_dict(_take(values, TRAINING_RESOURCES), "[[training]]")  # checked at load
        del values["composition"]
        out = compose.train(registry, t["composition"], values, address=self.address, gpus=resources.gpus,
                            cpus=resources.cpus, report=self.report)
        self.say(f"   composition {t['composition']}: {out['status']} ({out['path']})")

    def evaluate(self, registry, ev: dict) -> dict:
        from recycle import evaluation as E

        kw = {k: ev[k] for k in (*EvalSettings.names(), "cpus_per_task", "gpus_per_task") if k in ev}
        request = E.EvalRequest(methods=tuple(ev.get("methods", ())), compositions=tuple(ev.get("compositions", ())),
                                address=self.address, **kw)
        outcome = E.evaluate(registry, request, self.report)
        if outcome.failures:
            raise RecycleError(f"{len(outcome.failures)} evaluation job(s) failed: " + "; ".join(outcome.failures))
        out = {"run": outcome.run_id}
        default = registry.artifacts_dir / "results" / f"{self.p.name}-run{outcome.run_id}"
        target = output_target(ev.get("output") or str(default))
        about = {"pipeline": self.p.name, "command": f"recycle run {os.path.relpath(self.p.path)}", "evaluation": ev}
        out.update(E.export(registry, outcome.run_id, target, about=about, plot_method=ev.get("plot_method")))
        for k in ("json", "markdown", "plot"):
            if out.get(k):
                self.say(f"   {k}: {out[k]}")
        return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def builtin(name: str) -> Path:
    """A pipeline shipped with recycle (``pipelines/NAME.toml`` in the source tree)."""
    root = Path(__file__).resolve().parent.parent / "pipelines"
    path = root / f"{name}.toml"
    if not path.is_file():
        raise RecycleError(f"built-in pipeline {name} not found at {path} (install recycle from its source tree)")
    return path
