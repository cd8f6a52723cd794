"""Pipelines: a TOML file of steps (tasks, experts, gates, compositions, evaluations) run in
order by ``recycle run FILE``, each step skipped when its result is already in the registry,
so a pipeline resumes where a crash or Ctrl-C left it. Every step calls the same library
functions as the command a user types (``add-task``, ``train-expert``, ``add-expert``,
``train-gates``, ``compose``, ``eval``), with the same checks; values from the file are
never turned into command lines.

::

    name = "demo"
    base = "smollm2-135m"

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

    [[evaluations]]
    methods = ["base", "uniform", "arrow", "phatgoose"]
    tasks = "held-out"
    n = 100
    output = "results/demo"       # optional: JSON + Markdown table + routing plot
"""

from __future__ import annotations

import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from recycle import methods
from recycle.console import Reporter
from recycle.errors import RecycleError
from recycle.gates import GateSettings
from recycle.names import check_name
from recycle.training import TrainSettings

TOP_KEYS = {"name", "description", "base", "tasks", "train", "experts", "gates", "compositions", "evaluations"}
TRAIN_KEYS = {"rank", "alpha", "targets", "layers", "steps", "lr", "batch_size", "max_length", "warmup", "seed"}
EXPERT_KEYS = TRAIN_KEYS | {"task", "multitask", "name", "adapter", "dataset"}
GATE_KEYS = {"steps", "lr", "batch_size", "max_length", "warmup", "seed", "cpus_per_expert", "gpus_per_expert"}
COMPOSITION_KEYS = {"name", "method", "experts"}  # plus the method's own settings
EVAL_KEYS = {"methods", "compositions", "tasks", "n", "seed", "top_k", "batch_size", "cpus_per_task",
             "gpus_per_task", "output", "plot_method"}


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
    compositions: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)


def _bad(path: Path, msg: str) -> RecycleError:
    return RecycleError(f"{path}: {msg}")


def _check_keys(path, where: str, table, allowed: set) -> None:
    if not isinstance(table, dict):
        raise _bad(path, f"[{where}] must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _bad(path, f"unknown key(s) in [{where}]: {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def load(path: str | Path) -> Pipeline:
    """Parse and check a pipeline file; every problem is one line naming the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RecycleError(f"pipeline file {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise _bad(path, f"not valid TOML ({e})") from None
    _check_keys(path, "top level", raw, TOP_KEYS)
    for key in ("tasks", "train", "gates"):
        if key in raw and not isinstance(raw[key], dict):
            raise _bad(path, f"[{key}] must be a table")
    if not isinstance(raw.get("name"), str) or not raw["name"].strip():
        raise _bad(path, "needs name = \"...\"")
    if not isinstance(raw.get("base"), str):
        raise _bad(path, "needs base = \"...\" (an alias such as smollm2-135m, a folder or a hub id)")
    p = Pipeline(path=path.resolve(), name=raw["name"], base=raw["base"])
    tasks = raw.get("tasks", {})
    _check_keys(path, "tasks", tasks, {"catalogue", "specs"})
    p.tasks_catalogue = _str_list(path, "tasks.catalogue", tasks.get("catalogue", []))
    p.task_specs = [(path.parent / s).resolve() for s in _str_list(path, "tasks.specs", tasks.get("specs", []))]
    p.train = _train_values(path, "train", raw.get("train", {}))
    _check_keys(path, "train", p.train, TRAIN_KEYS | {"cpus_per_task", "gpus_per_task"})
    for key in ("cpus_per_task", "gpus_per_task"):
        if key in p.train:
            value = p.train.pop(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or (
                    key == "cpus_per_task" and not value > 0):
                raise _bad(path, f"[train] {key} must be a positive number")
            setattr(p, key, float(value))
    _checked(path, "[train]", lambda: TrainSettings.from_dict(p.train, "[train]"))
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
        if "adapter" in e and not isinstance(e["adapter"], str):
            raise _bad(path, f"expert {i + 1}: adapter must be a folder path")
        e = _train_values(path, f"experts {i + 1}", e)
        own = {k: v for k, v in e.items() if k in TRAIN_KEYS}
        if "adapter" in e and own:
            raise _bad(path, f"expert {i + 1}: an adapter is not trained here, so {sorted(own)[0]} does not apply")
        _checked(path, f"[[experts]] {i + 1}", lambda: TrainSettings.from_dict({**p.train, **own}, f"expert {i + 1}"))
        p.experts.append(e)
    if "gates" in raw:
        _check_keys(path, "gates", raw["gates"], GATE_KEYS)
        p.gates = raw["gates"]
        values = {k: v for k, v in p.gates.items() if k not in ("cpus_per_expert", "gpus_per_expert")}
        _checked(path, "[gates]", lambda: GateSettings.from_dict(values, "[gates]"))
    p.tasks_catalogue = [_named(path, "tasks.catalogue", "task", t) for t in p.tasks_catalogue]
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
        p.compositions.append(c)
    for i, ev in enumerate(_table_list(path, "evaluations", raw.get("evaluations", []))):
        _check_keys(path, f"evaluations {i + 1}", ev, EVAL_KEYS)
        if not ev.get("methods") and not ev.get("compositions"):
            raise _bad(path, f"evaluation {i + 1} needs methods or compositions")
        for key in ("methods", "compositions"):
            if key in ev:
                _str_list(path, f"evaluation {i + 1} {key}", ev[key])
        try:
            for spec in ev.get("methods", []):
                methods.parse(spec)
        except RecycleError as e:
            raise _bad(path, f"evaluation {i + 1}: {e}") from None
        p.evaluations.append(ev)
    return p


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

        registry = Registry(self.db)
        registry.check_writable()
        p = self.p
        t0 = time.time()
        self.step("tasks", lambda: self.tasks(registry))
        outputs = []
        to_train = [e for e in p.experts if "adapter" not in e
                    and registry.expert_or_none(e.get("name") or e.get("task")) is None]
        needs_ray = p.gates is not None or p.evaluations or to_train
        ctx = cluster.connect(self.address) if needs_ray else _null()
        with ctx:
            self.step("experts", lambda: self.experts(registry))
            if p.gates is not None:
                self.step("gates", lambda: self.train_gates(registry))
            self.step("compositions", lambda: self.compose(registry))
            for i, ev in enumerate(p.evaluations):
                self.step(f"evaluation {i + 1}", lambda ev=ev: outputs.append(self.evaluate(registry, ev)))
        self.say(f"pipeline {p.name}: done in {time.time() - t0:.0f} s; registry {registry.path}")
        return outputs

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
        values = dict(self.p.gates)
        resources = (values.pop("cpus_per_expert", 1.0), values.pop("gpus_per_expert", None))
        if resources != (self.p.cpus_per_task, self.p.gpus_per_task):
            return None
        return gates.GateSettings.from_dict(values, "[gates]")

    def train_gates(self, registry) -> None:
        from recycle import gates

        experts = [e for e in registry.experts() if not methods.is_multitask(e)]
        if not experts:
            raise RecycleError("[gates] given but no single-task experts to train gates for")
        values = dict(self.p.gates or {})
        cpus = values.pop("cpus_per_expert", 1.0)
        gpus = values.pop("gpus_per_expert", None)
        settings = gates.GateSettings.from_dict(values, "[gates]")
        outcomes = gates.train(registry, experts, settings, address=self.address, gpus_per_expert=gpus,
                               cpus_per_expert=cpus, report=self.report)
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

    def evaluate(self, registry, ev: dict) -> dict:
        from recycle import evaluation as E

        kw = {k: ev[k] for k in ("tasks", "n", "seed", "top_k", "batch_size", "cpus_per_task", "gpus_per_task")
              if k in ev}
        request = E.EvalRequest(methods=tuple(ev.get("methods", ())), compositions=tuple(ev.get("compositions", ())),
                                address=self.address, **kw)
        outcome = E.evaluate(registry, request, self.report)
        if outcome.failures:
            raise RecycleError(f"{len(outcome.failures)} evaluation job(s) failed: " + "; ".join(outcome.failures))
        out = {"run": outcome.run_id}
        target = ev.get("output") or str(registry.artifacts_dir / "results" / f"{self.p.name}-run{outcome.run_id}")
        target = Path(target) if Path(target).is_absolute() else (Path.cwd() / target)
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
