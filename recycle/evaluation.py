"""Evaluation: zero-shot (held-out tasks) and generalised zero-shot (a mix) by rank
classification, one Ray task per (method or composition, task).

The driver (:func:`evaluate`) plans jobs from the registry, reuses stored results with the
same key, runs the rest on Ray and records each result as it arrives; it returns the run
id. Workers (:func:`run_eval_group`, one per task) get plain data (plans, examples), load the
base model once, install each method in turn, rank-classify and return plain numbers, every
choice's score of every example included; the layers below every member's adapters run once
per example for all the methods of the task (:class:`~recycle.scoring.Trunk`: the same
scores, computed once). Only the driver writes the registry.

Held-in tasks have a registered single-task expert, held-out ones have none. For a mix
the generalised zero-shot numbers are S (mean accuracy over held-in tasks), U (over
held-out tasks) and H = 2SU/(S+U).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from recycle import cluster
from recycle import compose as comp
from recycle import methods
from recycle.console import Reporter
from recycle.errors import RecycleError
from recycle.methods import Plan
from recycle.registry import Registry
from recycle.results import task_sets
from recycle.stats import balanced_accuracy, mcnemar, paired_bootstrap, paired_bootstrap_balanced, suh, wilson

EVAL_FORMAT = "rank-classification/1"


@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate, on what, with which resources."""

    methods: tuple[str, ...] = ()
    compositions: tuple[str, ...] = ()
    tasks: str = "held-out"  # held-out, held-in, all, or comma-separated names
    n: int | None = None
    n_held_in: int | None = None  # held-in tasks' sample size where it differs from n
    seed: int = 0
    top_k: int | None = None  # for token-routed methods given by name (default: the method's)
    batch_size: int = 16
    cpus_per_task: float = 1.0
    gpus_per_task: float | None = None
    force: bool = False
    address: str | None = None
    share: bool = True  # one worker per task: one model load, the layers below the experts computed once
    dtype: str = "float32"  # --dtype; "auto" is resolved by evaluate() before anything is keyed
    split: str = "test"  # or "validation": choosing settings without the test examples

    def __post_init__(self):
        if self.n is not None and self.n < 1:
            raise RecycleError(f"-n must be at least 1, not {self.n}")
        if self.n_held_in is not None and self.n_held_in < 1:
            raise RecycleError(f"--n-held-in must be at least 1, not {self.n_held_in}")
        if not self.cpus_per_task > 0:
            raise RecycleError(f"--cpus-per-task must be positive, not {self.cpus_per_task}")
        if self.batch_size < 1:
            raise RecycleError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.split not in ("test", "validation"):
            raise RecycleError(f"--split must be test or validation, not {self.split!r}")
        if self.top_k is not None and self.top_k < 1:
            raise RecycleError(f"--top-k must be at least 1, not {self.top_k}")
        # a method or composition named twice runs once (order kept)
        object.__setattr__(self, "methods", tuple(dict.fromkeys(self.methods)))
        object.__setattr__(self, "compositions", tuple(dict.fromkeys(self.compositions)))
        if not self.tasks or not self.tasks.strip(" ,"):
            raise RecycleError("--tasks is empty: give held-out, held-in, all, or task names")
        for m in self.methods:
            methods.parse(m)

    def record(self) -> dict:
        """The run's settings as stored with it."""
        return {"methods": list(self.methods), "compositions": list(self.compositions), "tasks": self.tasks,
                "n": self.n, **({"n_held_in": self.n_held_in} if self.n_held_in is not None else {}),
                "seed": self.seed, "top_k": self.top_k,
                **({"dtype": self.dtype} if self.dtype != "float32" else {}),
                **({"split": self.split} if self.split != "test" else {})}


@dataclass
class EvalJob:
    """Everything a worker needs, as plain data."""

    label: str  # method or composition name, as shown in the table
    plan: dict  # methods.Plan as a dict
    task: str
    held: str  # "in" | "out"
    examples: list  # recycle.data.Example
    batch_size: int = 16
    max_length: int = 512
    key: str = ""  # result key (the plan's content key, task, n, seed, data)
    content_key: str = ""  # stored as eval_results.settings_hash
    member_hashes: dict = field(default_factory=dict)
    n: int = 0
    seed: int = 0


@dataclass
class EvalGroup(cluster.Job):
    """The (method, task) jobs of one task, run by one worker: one model load, one set of
    examples, and the layers below every member's adapters computed once (a shared
    :class:`~recycle.scoring.Trunk`)."""

    task: str
    jobs: list  # EvalJob, all of this task
    share: bool = True  # share the lower layers across the jobs


@dataclass
class EvalOutcome:
    run_id: int
    failures: list[str]
    skipped: list[dict]
    reused: int


def layer_of(module_path: str) -> int | None:
    m = re.search(r"\.(?:layers|block|h)\.(\d+)\.", module_path)
    return int(m.group(1)) if m else None


# ---- the worker ---------------------------------------------------------------------


def routing_cost(stats: dict) -> dict:
    """From per-module routing stats: mean LoRA expert products per token per routed module,
    and the share of tokens sent to each kind of expert (``lora`` or a computation-free
    kind: ``zero``, ``copy``, ``constant``), averaged over modules."""
    if not stats:
        return {}
    products = sum(s["lora_products"] for s in stats.values()) / len(stats)
    kinds: dict[str, float] = {}
    for s in stats.values():
        names = list(s["load"])
        n_lora = len(names) - sum(1 for n in names if n.startswith("@"))
        for i, (name, load) in enumerate(s["load"].items()):
            kind = "lora" if i < n_lora else re.sub(r"\d+$", "", name.lstrip("@"))
            kinds[kind] = kinds.get(kind, 0.0) + load / len(stats)
    return {"lora_products": products, "kinds": kinds}


def lowest_adapted_layer(plan: Plan) -> int | None:
    """The lowest decoder layer any member of ``plan`` adapts, or of a part it runs (COSMO's
    unseen side: ``data["parts"]``); 0 when unknown."""
    from recycle.adapters import LORA_KEY, read_safetensors_header

    lowest = None
    paths = dict.fromkeys(m.path for m in plan.members)
    for part in ((plan.data or {}).get("parts") or {}).values():
        paths.update(dict.fromkeys(m.path for m in Plan.from_dict(part).members))  # each header read once
    for path in paths:
        for key in read_safetensors_header(Path(path) / "adapter_model.safetensors"):
            found = LORA_KEY.match(key)
            layer = layer_of(found["path"] + ".") if found else None
            if layer is None:
                return 0
            lowest = layer if lowest is None else min(lowest, layer)
    return lowest


def _score_job(job: EvalJob, model, tok, trunk=None) -> dict:
    from recycle.scoring import predict

    t0 = time.time()
    plan = Plan.from_dict(job.plan)
    method = methods.get(plan.method)
    examples = job.examples
    scorer = method.scorer(plan, model, tok)
    try:
        kw = {"trunk": trunk} if trunk is not None else {}
        out = scorer.score(examples, [job.task] * len(examples), batch_size=job.batch_size,
                           max_length=job.max_length, record=True, **kw)
    finally:
        scorer.close()
    extra: dict = dict(out.extra)
    usage = {path: s["load"] for path, s in (out.stats or {}).items()}  # token-weighted, every forward
    if method.token_routed and out.stats:
        extra.update(routing_cost(out.stats))
    if out.experts is not None:
        extra["experts"] = out.experts
    preds = predict(out.scores)
    correct = sum(int(p == ex.label) for p, ex in zip(preds, examples))
    lo, hi = wilson(correct, len(examples))
    return {
        "label": job.label,
        "task": job.task,
        "n": len(examples),
        "correct": correct,
        "accuracy": correct / len(examples) if examples else float("nan"),
        "ci_low": lo,
        "ci_high": hi,
        "predictions": preds,
        "scores": out.scores,
        "labels": [ex.label for ex in examples],
        "routing": usage or None,
        "extra": extra or None,
        "seconds": time.time() - t0,
    }


def run_eval_group(group: EvalGroup) -> dict:
    """Every job of one task on one loaded base model (worker side). A job that fails is
    reported, the others go on: ``{"results": [{"result": ...} | {"error": line}]}``."""
    import torch

    from recycle.basemodels import load_base, resolve_base
    from recycle.scoring import Trunk

    torch.set_num_threads(max(1, int(group.threads)))
    torch.manual_seed(0)
    t0 = time.time()
    first = Plan.from_dict(group.jobs[0].plan)
    device = cluster.device(group.device)  # before loading: a GPU torch cannot see stops the task at once
    model, tok = load_base(resolve_base(first.base), dtype=group.dtype)
    model.to(device)
    trunk = None
    shared = [j for j in group.jobs if methods.get(j.plan["method"]).shares_trunk]
    if group.share and len(shared) > 1:
        starts = [lowest_adapted_layer(Plan.from_dict(j.plan)) for j in shared]
        trunk = Trunk.for_model(model, min((s for s in starts if s is not None), default=None))
    out = []
    for job in group.jobs:
        try:
            out.append({"result": _score_job(job, model, tok, trunk if job in shared else None)})
        except RecycleError as e:
            out.append({"error": str(e)})
        except Exception as e:  # noqa: BLE001 - one job's failure is reported; the others go on
            out.append({"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
    return {"results": out, "seconds": time.time() - t0, "trunk": trunk.start if trunk else None}


# ---- the driver ---------------------------------------------------------------------


def choose_tasks(registry: Registry, spec: str) -> list[tuple[str, str]]:
    held_in, held_out = task_sets(registry)
    if spec == "held-out":
        chosen = held_out
    elif spec == "held-in":
        chosen = held_in
    elif spec == "all":
        chosen = held_in + held_out
    else:
        chosen = list(dict.fromkeys(t.strip() for t in spec.split(",") if t.strip()))  # each task once, in order
        unknown = [t for t in chosen if t not in held_in + held_out]
        if unknown:
            raise RecycleError(f"unknown task(s): {', '.join(unknown)} (see recycle tasks list)")
    if not chosen:
        raise RecycleError(f"no {spec} tasks registered (held-in: {len(held_in)}, held-out: {len(held_out)})")
    return [(t, "in" if t in held_in else "out") for t in chosen]


def result_key(plan: Plan, registry: Registry, task: str, n: int | None, seed: int, dtype: str = "float32",
               split: str = "test") -> str:
    """Equal keys, equal results: the plan's content key, base, the task spec's hash (a
    changed spec means new examples), n, seed, the dtype unless float32 (results stored
    before dtypes existed were float32 and keep their keys) and the split unless test (idem)."""
    spec = registry.task(task)["spec_sha256"]
    parts = [EVAL_FORMAT, plan.content_key, plan.base, task, spec, n, seed] + ([dtype] if dtype != "float32" else []) \
        + ([{"split": split}] if split != "test" else [])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def plan_eval(registry: Registry, request: EvalRequest) -> tuple[list[EvalJob], list[dict]]:
    """The jobs to run and the notes on (method, task) pairs skipped (with the reason)."""
    from recycle.tasks import load_examples

    chosen_tasks = choose_tasks(registry, request.tasks)
    plans: list[Plan] = [comp.plan(registry, composition=c, data_seed=request.seed) for c in request.compositions]
    skipped: list[dict] = []
    for spec in request.methods:
        m, _ = methods.parse(spec)
        reason = m.unavailable(registry)
        if reason:
            skipped.append({"label": spec, "task": "*", "reason": reason})
            continue
        settings = {"top_k": request.top_k} if request.top_k is not None and "top_k" in m.Settings.names() else {}
        plans.append(comp.plan(registry, method=spec, settings=settings, data_seed=request.seed))
    jobs = []
    examples_cache: dict[str, list] = {}
    for p in plans:
        for task, held in chosen_tasks:
            reason = methods.get(p.method).skips(p, task)
            if reason:
                skipped.append({"label": p.label, "task": task, "reason": reason})
                continue
            n = request.n_held_in if held == "in" and request.n_held_in is not None else request.n
            if task not in examples_cache:
                examples_cache[task] = load_examples(registry, task, request.split, n=n, seed=request.seed)
                if not examples_cache[task]:
                    raise RecycleError(f"task {task}: empty {request.split} split")
            exs = examples_cache[task]
            jobs.append(EvalJob(p.label, p.to_dict(), task, held, exs, batch_size=request.batch_size,
                                key=result_key(p, registry, task, n, request.seed, request.dtype, request.split),
                                content_key=p.content_key, member_hashes=p.member_hashes, n=len(exs),
                                seed=request.seed))
    return jobs, skipped


def _row(run_id: int, job: EvalJob, result: dict, reused_from: int | None = None, dtype: str = "float32") -> dict:
    keep = ("n", "correct", "accuracy", "ci_low", "ci_high", "routing", "predictions", "scores", "labels", "extra",
            "seconds")
    return {"run_id": run_id, "key": job.key, "label": job.label, "method": job.plan["method"],
            "settings_hash": job.content_key, "member_hashes": job.member_hashes, "task": job.task,
            "held": job.held, "seed": job.seed, "reused_from": reused_from, "dtype": dtype,
            **{k: result.get(k) for k in keep + ("memory",)}}


def evaluate(registry: Registry, request: EvalRequest, report: Reporter | None = None) -> EvalOutcome:
    """Run an evaluation (see the module docstring); returns its run id, the failed jobs
    (one line each) and the skipped (method, task) pairs. An interrupt marks the run
    ``interrupted`` (the results recorded so far stay, each whole) and propagates."""
    report = report or Reporter()
    if not request.methods and not request.compositions:
        raise RecycleError("nothing to evaluate: give methods or compositions")
    registry.check_writable()
    registry.mark_dead_runs()
    request = replace(request, dtype=cluster.resolve_dtype(request.dtype, request.gpus_per_task))
    jobs, skipped = plan_eval(registry, request)
    t0 = time.time()
    run_id = registry.start_run(request.record())
    todo, reused = [], 0
    for job in jobs:
        old = None if request.force else registry.stored_result(job.key)
        if old is not None and old.get("scores") is not None:
            registry.record_result(_row(run_id, job, old, reused_from=old["id"], dtype=request.dtype))
            reused += 1
        else:
            todo.append(job)
    if reused:
        report.say(f"reusing {reused} stored result(s) for the same settings (--force recomputes)")
    for s in skipped:
        report.say(f"skip {s['label']} on {s['task']}: {s['reason']}")
    failures: list[str] = []
    with registry.recording_run(run_id, t0, failures):
        by_task: dict[str, list[EvalJob]] = {}
        for job in todo:
            by_task.setdefault(job.task, []).append(job)
        groups = [EvalGroup(task, jobs, share=request.share, dtype=request.dtype) for task, jobs in by_task.items()]
        groups.sort(key=lambda g: -sum(j.n for j in g.jobs))  # the longest first

        def fail(job, reason):
            failures.append(f"{job.label} on {job.task}: {reason}")
            report.fail(f"{job.label} on {job.task}: {reason}")

        def on_result(group, res):
            for job, entry in zip(group.jobs, res["results"]):
                if "error" in entry:
                    fail(job, entry["error"])
                    continue
                result = {**entry["result"], "memory": res.get("memory")}  # the group's task's peak
                registry.record_result(_row(run_id, job, result, dtype=request.dtype))
                report.ok(f"{job.label} on {job.task}: {result['accuracy']:.3f} "
                          f"[{result['ci_low']:.3f}, {result['ci_high']:.3f}] n={result['n']}, "
                          f"{result['seconds']:.1f} s")

        def on_error(group, reason):
            for job in group.jobs:
                fail(job, reason)

        cluster.run(run_eval_group, groups, cluster.Resources(request.cpus_per_task, request.gpus_per_task), "eval",
                    on_result, on_error=on_error, address=request.address, report=report,
                    weight=lambda group: len(group.jobs),
                    what=f"evaluating {len(todo)} (method, task) job(s) in {len(groups)} task group(s)")
    return EvalOutcome(run_id, failures, skipped, reused)


# ---- reading results ------------------------------------------------------------------


METRICS = ("accuracy", "balanced")


def metric_of(row: dict, metric: str = "accuracy") -> float | None:
    """A stored result's score: its accuracy, or its balanced accuracy (mean recall over the
    classes of its test sample, from the stored labels and predictions; None where the
    result was stored without them)."""
    if metric == "accuracy":
        return row["accuracy"]
    if metric != "balanced":
        raise RecycleError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if not row.get("labels") or row.get("predictions") is None:
        return None
    return balanced_accuracy(row["labels"], row["predictions"])


def summarise(rows: list[dict], metric: str = "accuracy") -> dict:
    """Methods x tasks table of ``metric`` (accuracy, or balanced accuracy) plus held-in and
    held-out averages and S/U/H."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    held = {r["task"]: r["held"] for r in rows}
    tasks = sorted(held, key=lambda t: (held[t] != "in", t))  # held-in first, then held-out
    table = {}
    for label in labels:
        acc = {r["task"]: v for r in rows if r["label"] == label and (v := metric_of(r, metric)) is not None}
        ins = [acc[t] for t in tasks if t in acc and held[t] == "in"]
        outs = [acc[t] for t in tasks if t in acc and held[t] == "out"]
        entry = {"tasks": acc,
                 "held_in_avg": sum(ins) / len(ins) if ins else None,
                 "held_out_avg": sum(outs) / len(outs) if outs else None}
        n_in = sum(1 for t in tasks if held[t] == "in")
        n_out = len(tasks) - n_in
        if n_in and n_out and len(ins) == n_in and len(outs) == n_out:
            entry.update(suh(ins, outs))
        table[label] = entry
    out = {"metric": metric, "tasks": tasks, "held": held, "methods": table}
    gates = gate_quality(rows)
    if gates:
        out["gates"] = gates
    return out


def gate_quality(rows: list[dict]) -> dict:
    """For COSMO's results (a per-example seen probability), the gate's seen/unseen AUC, its
    expected calibration error and its reliability diagram, over every example of the run
    (truth: the task is held-in).

    COSMO stores two: ``g``, its gate's P(seen | x) (the logistic regression its folds fit and
    report AUC and ECE of), and ``p_seen`` = 1 − p_U, the weight the combination gives the seen
    side: ``σ((g − θ) / T)``, sharpened by the T chosen to maximise H, so a decision weight
    rather than a probability. The gate's numbers are those of ``g`` (the folds' quantity);
    ``weight_ece`` is the ECE of ``p_seen``."""
    from recycle.stats import auc, expected_calibration_error

    out = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label and (r.get("extra") or {}).get("g")]
        if not mine:
            continue
        conf, weight, truth = [], [], []
        for r in mine:
            conf += r["extra"]["g"]
            weight += r["extra"]["p_seen"]
            truth += [r["held"] == "in"] * len(r["extra"]["p_seen"])
        if any(truth) and not all(truth):
            ece = expected_calibration_error(conf, truth)
            out[label] = {"auc": auc(conf, truth), "ece": ece["ece"], "bins": ece["bins"], "n": len(conf),
                          "weight_ece": expected_calibration_error(weight, truth)["ece"]}
    return out


def gate_line(label: str, g: dict) -> str:
    """One line on a run's seen/unseen gate (see :func:`gate_quality`)."""
    return (f"{label}: seen/unseen gate AUC {g['auc']:.3f}, expected calibration error {g['ece']:.3f} (of its "
            f"P(seen); of the combination's seen weight 1 − p_U, sharpened by θ and T, {g['weight_ece']:.3f}) "
            f"over {g['n']} examples")


def memory_line(rows: list[dict]) -> str:
    """The dtypes a run's results were computed in and its workers' peak memory: one line."""
    dtypes = sorted({r.get("dtype") or "float32" for r in rows})
    mems = [r["memory"] for r in rows if r.get("memory")]
    line = f"dtype {', '.join(dtypes)}"
    if not mems:
        return line + "; peak memory not recorded"
    line += f"; peak worker RSS {max(m['peak_rss_mib'] for m in mems):.0f} MiB"
    cuda = [m["cuda_peak_mib"] for m in mems if m.get("cuda_peak_mib") is not None]
    return line + (f", CUDA {max(cuda):.0f} MiB" if cuda else "") + f" (max over {len(mems)} result(s))"


def fmt(x) -> str:
    """An accuracy (or any float) with three decimals; blank for None or NaN."""
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The results table of :func:`summarise` as (header, rows of formatted cells): methods
    as rows; tasks, held-in and held-out averages, and S/U/H where the run mixes both."""
    tasks = summary["tasks"]
    has_suh = any("H" in m for m in summary["methods"].values())
    kinds = summary.get("near_far") or {}  # held-out near/far (recycle.results.add_near_far)
    head = ["method"] + [f"{t} ({kinds.get(t, summary['held'][t])})" for t in tasks] + ["held-in avg", "held-out avg"]
    keys = (["held_out_near_avg", "held_out_far_avg"] if kinds else []) + (["S", "U", "H"] if has_suh else [])
    names = {"held_out_near_avg": "held-out near avg", "held_out_far_avg": "held-out far avg"}
    body = [
        [label] + [fmt(m["tasks"].get(t)) for t in tasks] + [fmt(m["held_in_avg"]), fmt(m["held_out_avg"])]
        + [fmt(m.get(k)) for k in keys]
        for label, m in summary["methods"].items()
    ]
    return head + [names.get(k, k) for k in keys], body


def routing_matrices(rows: list[dict], label: str | None = None):
    """For routed results: (label, task x expert usage, layer x expert usage, experts, tasks, layers)."""
    routed = [r for r in rows if r.get("routing")]
    if not routed:
        return None
    label = label or next((r["label"] for r in routed if r["method"] == "phatgoose"), routed[0]["label"])
    routed = sorted((r for r in routed if r["label"] == label), key=lambda r: (r["held"] != "in", r["task"]))
    if not routed:
        raise RecycleError(f"no routing recorded for {label!r} in this run")
    experts = sorted({e for r in routed for loads in r["routing"].values() for e in loads})
    tasks = [r["task"] for r in routed]
    layers = sorted({layer_of(p) for r in routed for p in r["routing"]} - {None})
    te = [[0.0] * len(experts) for _ in tasks]
    le = [[0.0] * len(experts) for _ in layers]
    lcount = [0] * len(layers)
    col, lrow = {e: i for i, e in enumerate(experts)}, {x: i for i, x in enumerate(layers)}
    for ti, r in enumerate(routed):
        mods = r["routing"]
        for path, loads in mods.items():
            for e, v in loads.items():
                te[ti][col[e]] += v / len(mods)
            li = layer_of(path)
            if li is not None:
                k = lrow[li]
                for e, v in loads.items():
                    le[k][col[e]] += v
                lcount[k] += 1
    le = [[v / max(lcount[k], 1) for v in row] for k, row in enumerate(le)]
    return {"label": label, "experts": experts, "tasks": tasks, "layers": layers,
            "task_expert": te, "layer_expert": le}


def top_experts(mats: dict, keep: int) -> dict:
    """``mats`` (:func:`routing_matrices`) with only the ``keep`` experts of the largest total
    share over the tasks, the others summed into one column ``other (M)``: what a table or a
    plot of a large library can show (0: every expert)."""
    n = len(mats["experts"])
    if not keep or n <= keep:
        return mats
    total = [sum(row[j] for row in mats["task_expert"]) for j in range(n)]
    top = sorted(sorted(range(n), key=lambda j: -total[j])[:keep])
    rest = sorted(set(range(n)) - set(top))

    def cut(rows):
        return [[row[j] for j in top] + [sum(row[j] for j in rest)] for row in rows]

    return {**mats, "experts": [mats["experts"][j] for j in top] + [f"other ({len(rest)})"],
            "task_expert": cut(mats["task_expert"]), "layer_expert": cut(mats["layer_expert"])}


def plot_routing(mats: dict | None, path, gates: dict | None = None) -> None:
    """Routing heatmaps (task × expert, layer × expert) and, for a gated ensemble (COSMO),
    the gate's reliability diagram, in one PNG (written atomically)."""
    from recycle.files import atomic_path, output_target

    output_target(path)  # checked before drawing
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = gates or {}
    panels = (2 if mats else 0) + (1 if gates else 0)
    width = (6 + 0.5 * len(mats["experts"]) if mats else 0) + (4 if gates else 0)
    height = 2 + 0.3 * max(len(mats["tasks"]), len(mats["layers"]) / 2) if mats else 4
    fig, axes = plt.subplots(1, panels, figsize=(width, max(height, 4)), squeeze=False)
    axes = list(axes[0])
    if gates:
        ax = axes.pop()
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
        for label, g in gates.items():
            xs = [b["confidence"] for b in g["bins"]]
            ys = [b["frequency"] for b in g["bins"]]
            ax.plot(xs, ys, marker="o", label=f"{label} (ECE {g['ece']:.3f}, AUC {g['auc']:.3f})")
        ax.set_xlabel("p(seen) predicted", fontsize=8)
        ax.set_ylabel("share of inputs from held-in tasks", fontsize=8)
        ax.set_title("gate reliability", fontsize=9)
        ax.legend(fontsize=7)
    heatmaps = [] if not mats else [
        (axes[0], "task_expert", mats["tasks"], "task × expert"),
        (axes[1], "layer_expert", [str(x) for x in mats["layers"]], "layer × expert"),
    ]
    for ax, key, rows, title in heatmaps:
        im = ax.imshow(mats[key], aspect="auto", cmap="viridis", vmin=0)
        ax.set_xticks(range(len(mats["experts"])), mats["experts"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_title(f"{mats['label']}: {title} (share of tokens)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path, make_parents=False) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def correct_of(row: dict) -> list[bool] | None:
    """Per-example correctness of a stored result (None for results stored without it)."""
    if row.get("predictions") is None or row.get("labels") is None:
        return None
    return [p == y for p, y in zip(row["predictions"], row["labels"])]


def compare(rows: list[dict], a: str, b: str, reps: int = 10_000, metric: str = "accuracy") -> dict:
    """Paired comparison of methods (labels) ``a`` and ``b`` on the same examples of each task
    in a run: per task the exact McNemar test (accuracy) or a paired bootstrap (balanced
    accuracy); over the held-in and over the held-out tasks (and all of them) a paired
    bootstrap of the macro difference of ``metric``, a minus b."""
    if metric not in METRICS:
        raise RecycleError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    by = {(r["label"], r["task"]): r for r in rows}
    labels = {r["label"] for r in rows}
    for x in (a, b):
        if x not in labels:
            raise RecycleError(f"no results for {x!r} in this run (it has: {', '.join(sorted(labels))})")
    per_task, groups = [], {"in": [], "out": []}
    for task in sorted({r["task"] for r in rows}):
        ra, rb = by.get((a, task)), by.get((b, task))
        if ra is None or rb is None:
            continue
        ca, cb = correct_of(ra), correct_of(rb)
        if ca is None or cb is None:
            continue
        if ra["n"] != rb["n"] or ra["seed"] != rb["seed"] or ra["labels"] != rb["labels"]:
            raise RecycleError(f"{a} and {b} were not scored on the same examples of {task}")
        test = mcnemar(ca, cb)
        va, vb = metric_of(ra, metric), metric_of(rb, metric)
        if metric == "balanced":
            group = (ra["labels"], ra["predictions"], rb["predictions"])
            test["p"] = paired_bootstrap_balanced([group], reps=reps)["p"]
        else:
            group = (ca, cb)
        per_task.append({"task": task, "held": ra["held"], "a": va, "b": vb, "diff": va - vb, **test})
        groups[ra["held"]].append(group)
    if not per_task:
        raise RecycleError(f"no task has per-example results of both {a} and {b} (re-evaluate with --force)")
    boot = paired_bootstrap_balanced if metric == "balanced" else paired_bootstrap
    pooled = {}
    for name, gs in (("held-in", groups["in"]), ("held-out", groups["out"]), ("all", groups["in"] + groups["out"])):
        if gs:
            pooled[name] = {"tasks": len(gs), **boot(gs, reps=reps)}
    return {"a": a, "b": b, "metric": metric, "tasks": per_task, "pooled": pooled}


def _markdown(summary: dict) -> list[str]:
    head, body = table(summary)
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in body]


def markdown_table(summary: dict, rows: list[dict], balanced: dict | None = None, split: str = "test") -> str:
    """The accuracy table (and, given its summary, the balanced-accuracy table) as markdown."""
    n = sorted({r["n"] for r in rows})
    lines = _markdown(summary)
    half = max((r["ci_high"] - r["ci_low"]) / 2 for r in rows) if rows else 0
    lines.append("")
    lines.append(f"Accuracy by rank classification; n = {', '.join(map(str, n))} {split} examples per task "
                 f"(widest 95% Wilson half-interval ±{half * 100:.1f} points).")
    for label, g in (summary.get("gates") or {}).items():
        lines.append(gate_line(label, g) + ".")
    if balanced and balanced["methods"]:
        lines += ["", "Balanced accuracy (per task the mean over its classes of the share of that class answered "
                  "right: a constant answer scores 1 / classes, whatever the split's balance):", ""]
        lines += _markdown(balanced)
    return "\n".join(lines) + "\n"


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, 4)


def export(registry: Registry, run_id: int, target, *, about: dict | None = None, plot_method: str | None = None) -> dict:
    """``<target>.json`` (every number but the per-example ones), ``<target>.md`` (the table)
    and ``<target>.png`` (routing heatmaps, when a routed method ran), each written
    atomically. Returns the paths written."""
    from pathlib import Path

    from recycle.files import output_target, write_json, write_text

    target = Path(target)
    for suffix in (".json", ".md", ".png"):  # all refused before any is written
        output_target(target.with_suffix(suffix), make_parents=True)
    rows = registry.run_results(run_id)
    summary = summarise(rows)
    from recycle.results import near_far, run_split

    balanced = summarise(rows, "balanced")
    near_far(registry, summary, balanced)  # one registry lookup for both metrics
    balanced.pop("gates", None)
    per_example = ("predictions", "routing", "scores", "labels")
    data = {
        **(about or {}),
        "run": run_id,
        "summary": summary,
        "balanced": balanced,
        "results": [{k: (_num(v) if isinstance(v, float) else v) for k, v in r.items() if k not in per_example}
                    for r in rows],
    }
    write_json(target.with_suffix(".json"), data)
    write_text(target.with_suffix(".md"), markdown_table(summary, rows, balanced, run_split(registry, run_id)))
    out = {"json": str(target.with_suffix(".json")), "markdown": str(target.with_suffix(".md"))}
    mats = routing_matrices(rows, plot_method)
    if mats or summary.get("gates"):
        plot_routing(mats, target.with_suffix(".png"), summary.get("gates"))
        out["plot"] = str(target.with_suffix(".png"))
    return out
