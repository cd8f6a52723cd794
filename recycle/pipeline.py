"""Pipelines: a TOML file of steps (tasks, experts, gates, compositions, evaluations) run in
order by ``recycle run FILE``, each step skipped when its result is already in the registry,
so a pipeline resumes where a crash or Ctrl-C left it. Every step goes through the same
commands a user types (in-process), so a pipeline is exactly its commands.

::

    name = "demo"
    base = "smollm2-135m"

    [tasks]
    catalogue = ["vader_tweets", "trec_coarse"]   # built-in task specs
    specs = ["my_task.toml"]                      # user specs, relative to this file

    [train]                       # defaults for every trained expert (train-expert options)
    rank = 8
    layers = "top8"
    steps = 80

    [[experts]]                   # train-expert --task (or multitask = [...], or adapter = "dir")
    task = "vader_tweets"

    [gates]                       # train-gates options, for every expert
    steps = 40

    [[compositions]]
    name = "pg"
    method = "phatgoose"

    [[evaluations]]
    methods = ["base", "uniform", "arrow", "phatgoose"]
    tasks = "held-out"
    n = 100
    output = "results/demo"       # optional: JSON + Markdown table + routing plot
"""

from __future__ import annotations

import json
import math
import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from recycle.errors import RecycleError

TOP_KEYS = {"name", "description", "base", "tasks", "train", "experts", "gates", "compositions", "evaluations"}
TRAIN_KEYS = {"rank", "alpha", "targets", "layers", "steps", "lr", "batch_size", "max_length", "warmup", "seed"}
EXPERT_KEYS = TRAIN_KEYS | {"task", "multitask", "name", "adapter", "dataset"}
GATE_KEYS = {"steps", "lr", "batch_size", "max_length", "warmup", "seed", "cpus_per_expert", "gpus_per_expert"}
COMPOSITION_KEYS = {"name", "method", "experts", "top_k", "weighting", "temperature"}
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
    if not isinstance(raw.get("name"), str) or not raw["name"].strip():
        raise _bad(path, "needs name = \"...\"")
    if not isinstance(raw.get("base"), str):
        raise _bad(path, "needs base = \"...\" (an alias such as smollm2-135m, a folder or a hub id)")
    p = Pipeline(path=path.resolve(), name=raw["name"], base=raw["base"])
    tasks = raw.get("tasks", {})
    _check_keys(path, "tasks", tasks, {"catalogue", "specs"})
    p.tasks_catalogue = _str_list(path, "tasks.catalogue", tasks.get("catalogue", []))
    p.task_specs = [(path.parent / s).resolve() for s in _str_list(path, "tasks.specs", tasks.get("specs", []))]
    p.train = raw.get("train", {})
    _check_keys(path, "train", p.train, TRAIN_KEYS)
    for i, e in enumerate(_table_list(path, "experts", raw.get("experts", []))):
        _check_keys(path, f"experts {i + 1}", e, EXPERT_KEYS)
        kinds = [k for k in ("task", "multitask", "adapter") if k in e]
        if len(kinds) != 1:
            raise _bad(path, f"expert {i + 1} needs exactly one of task, multitask or adapter")
        if "multitask" in e and not e.get("name"):
            raise _bad(path, f"expert {i + 1}: a multitask expert needs a name")
        p.experts.append(e)
    if "gates" in raw:
        _check_keys(path, "gates", raw["gates"], GATE_KEYS)
        p.gates = raw["gates"]
    for i, c in enumerate(_table_list(path, "compositions", raw.get("compositions", []))):
        _check_keys(path, f"compositions {i + 1}", c, COMPOSITION_KEYS)
        if not c.get("name") or not c.get("method"):
            raise _bad(path, f"composition {i + 1} needs name and method")
        p.compositions.append(c)
    for i, ev in enumerate(_table_list(path, "evaluations", raw.get("evaluations", []))):
        _check_keys(path, f"evaluations {i + 1}", ev, EVAL_KEYS)
        if not ev.get("methods") and not ev.get("compositions"):
            raise _bad(path, f"evaluation {i + 1} needs methods or compositions")
        p.evaluations.append(ev)
    return p


def _str_list(path, where, value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(path, f"{where} must be a list of strings")
    return value


def _table_list(path, where, value) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _bad(path, f"[[{where}]] must be an array of tables")
    return value


def _opt(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else []
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return [flag, str(value)]


class Runner:
    """Runs a pipeline's steps in order through the CLI commands, in this process."""

    def __init__(self, pipeline: Pipeline, db: Path | None, address: str | None, say):
        self.p, self.db, self.address, self.say = pipeline, db, address, say

    def cli(self, *args: str) -> None:
        import click
        import typer

        from recycle.cli import app

        argv = [*args] + (["--db", str(self.db)] if self.db else [])
        try:
            code = typer.main.get_command(app).main(argv, prog_name="recycle", standalone_mode=False)
        except click.exceptions.Exit as e:
            code = e.exit_code
        except click.ClickException as e:
            raise RecycleError(f"step `recycle {' '.join(args)}`: {e.format_message()}") from None
        if code not in (None, 0):
            raise RecycleError(f"step `recycle {' '.join(args)}` failed (exit {code}); fix it and run again to resume")

    def run(self) -> list[dict]:
        from recycle import cluster
        from recycle.registry import Registry

        registry = Registry(self.db)
        p = self.p
        t0 = time.time()
        self.step("tasks", lambda: self.tasks(registry))
        self.step("experts", lambda: self.experts(registry))
        outputs = []
        needs_ray = p.gates is not None or p.evaluations
        ctx = cluster.connect(self.address) if needs_ray else _null()
        with ctx:
            if p.gates is not None:
                self.step("gates", lambda: self.train_gates(registry))
            self.step("compositions", self.compose)
            for i, ev in enumerate(p.evaluations):
                self.step(f"evaluation {i + 1}", lambda ev=ev: outputs.append(self.evaluate(registry, ev)))
        self.say(f"pipeline {p.name}: done in {time.time() - t0:.0f} s; registry {registry.path}")
        return outputs

    def step(self, name: str, fn) -> None:
        t = time.time()
        self.say(f"── {self.p.name}: {name}")
        fn()
        self.say(f"   {name} done ({time.time() - t:.0f} s)")

    def tasks(self, registry) -> None:
        if self.p.tasks_catalogue:
            self.cli("tasks", "catalogue", "--add", *self.p.tasks_catalogue)
        for spec in self.p.task_specs:
            self.cli("add-task", str(spec))

    def experts(self, registry) -> None:
        for e in self.p.experts:
            if "adapter" in e:
                adapter = (self.p.path.parent / e["adapter"]).resolve()
                args = ["add-expert", str(adapter), "--base", self.p.base]
                for k in ("name", "task", "dataset"):
                    if e.get(k):
                        args += _opt(k, e[k])
                self.cli(*args)
                continue
            name = e.get("name") or e.get("task")
            if registry.expert_or_none(name) is not None:
                self.say(f"   expert {name}: already registered, skipped")
                continue
            settings = {**self.p.train, **{k: v for k, v in e.items() if k in TRAIN_KEYS}}
            args = ["train-expert", "--base", self.p.base]
            args += _opt("multitask", e["multitask"]) if "multitask" in e else _opt("task", e["task"])
            if e.get("name"):
                args += _opt("name", e["name"])
            for k, v in settings.items():
                args += _opt(k, v)
            self.cli(*args)

    def train_gates(self, registry) -> None:
        from recycle.compose import is_multitask

        names = [e["name"] for e in registry.experts() if not is_multitask(e)]
        if not names:
            raise RecycleError(f"{self.p.path}: [gates] given but no single-task experts to train gates for")
        args = ["train-gates", *names]
        for k, v in (self.p.gates or {}).items():
            args += _opt(k, v)
        if self.address:
            args += ["--address", self.address]
        self.cli(*args)

    def compose(self) -> None:
        for c in self.p.compositions:
            args = ["compose", "create", c["name"], "--method", c["method"], "--replace"]
            args += _opt("experts", c["experts"]) if c.get("experts") else ["--all"]
            for k in ("top_k", "weighting", "temperature"):
                if k in c:
                    args += _opt(k, c[k])
            self.cli(*args)

    def evaluate(self, registry, ev: dict) -> dict:
        args = ["eval"]
        for k in ("methods", "compositions", "tasks", "seed", "top_k", "batch_size", "cpus_per_task", "gpus_per_task"):
            if k in ev:
                args += _opt(k, ev[k])
        if "n" in ev:
            args += ["-n", str(ev["n"])]
        if self.address:
            args += ["--address", self.address]
        self.cli(*args)
        run_id = registry.db.execute("select max(id) from eval_runs").fetchone()[0]
        out = {"run": run_id}
        target = ev.get("output") or str(registry.artifacts_dir / "results" / f"{self.p.name}-run{run_id}")
        target = Path(target) if Path(target).is_absolute() else (Path.cwd() / target)
        out.update(write_results(registry, run_id, target, self.p, ev))
        for k in ("json", "markdown", "plot"):
            if out.get(k):
                self.say(f"   {k}: {out[k]}")
        return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, 4)


def write_results(registry, run_id: int, target: Path, pipeline: Pipeline | None = None, ev: dict | None = None) -> dict:
    """``<target>.json`` (every number), ``<target>.md`` (the table) and ``<target>.png``
    (routing heatmaps, when a routed method ran), each written to a temp name and renamed."""
    from recycle import evaluation as E

    rows = E.run_rows(registry, run_id)
    summary = E.summarise(rows)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "pipeline": pipeline.name if pipeline else None,
        "run": run_id,
        "command": f"recycle run {os.path.relpath(pipeline.path)}" if pipeline else None,
        "evaluation": ev,
        "summary": summary,
        "results": [
            {k: (_num(v) if isinstance(v, float) else v) for k, v in r.items() if k not in ("predictions", "routing")}
            for r in rows
        ],
    }
    _write(target.with_suffix(".json"), json.dumps(data, indent=2, default=str) + "\n")
    _write(target.with_suffix(".md"), markdown_table(E.table(summary), rows))
    out = {"json": str(target.with_suffix(".json")), "markdown": str(target.with_suffix(".md"))}
    mats = E.routing_matrices(rows, (ev or {}).get("plot_method"))
    if mats:
        E.plot_routing(mats, target.with_suffix(".png"))
        out["plot"] = str(target.with_suffix(".png"))
    return out


def markdown_table(table: tuple[list[str], list[list[str]]], rows: list[dict]) -> str:
    head, body = table
    n = sorted({r["n"] for r in rows})
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    half = max((r["ci_high"] - r["ci_low"]) / 2 for r in rows) if rows else 0
    lines.append("")
    lines.append(f"Accuracy by rank classification; n = {', '.join(map(str, n))} test examples per task "
                 f"(widest 95% Wilson half-interval ±{half * 100:.1f} points).")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def builtin(name: str) -> Path:
    """A pipeline shipped with recycle (``pipelines/NAME.toml`` in the source tree)."""
    root = Path(__file__).resolve().parent.parent / "pipelines"
    path = root / f"{name}.toml"
    if not path.is_file():
        raise RecycleError(f"built-in pipeline {name} not found at {path} (install recycle from its source tree)")
    return path
