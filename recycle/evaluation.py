"""Zero-shot and generalised zero-shot evaluation (SPEC sections 1 and 3).

The driver (:func:`plan_eval`) decides the (method, task) jobs: which examples (seeded
sample of each task's test split), which experts, the settings hash that identifies a
result; results already stored for the same key are reused. Each job runs anywhere, a
Ray worker included (:func:`run_eval_job`): load the base model, install the method,
rank-classify, and return plain numbers. Only the driver writes the registry.

Held-in tasks have a registered single-task expert, held-out ones have none. For a mix
the generalised zero-shot numbers are S (mean accuracy over held-in tasks), U (over
held-out tasks) and H = 2SU/(S+U).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field

from recycle import compose as comp
from recycle.errors import RecycleError
from recycle.registry import Registry, encode_json, now

DEFAULT_METHODS = ("base", "uniform", "arrow", "avg-activation", "retrieval", "phatgoose", "oracle", "multitask")
EVAL_FORMAT = "rank-classification/1"


@dataclass
class EvalJob:
    """Everything a worker needs, as plain data."""

    label: str  # method or composition name, as shown in the table
    plan: dict  # compose.Plan as a dict
    task: str
    held: str  # "in" | "out"
    examples: list  # recycle.data.Example
    batch_size: int = 16
    max_length: int = 512
    threads: int = 1
    key: str = ""  # result key (settings hash, task, n, seed, data)
    settings_hash: str = ""
    member_hashes: dict = field(default_factory=dict)
    n: int = 0
    seed: int = 0


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def suh(seen: list[float], unseen: list[float]) -> dict:
    """Generalised zero-shot: S, U (macro accuracies) and their harmonic mean H."""
    s = sum(seen) / len(seen) if seen else float("nan")
    u = sum(unseen) / len(unseen) if unseen else float("nan")
    h = 2 * s * u / (s + u) if seen and unseen and (s + u) > 0 else float("nan")
    return {"S": s, "U": u, "H": h}


def layer_of(module_path: str) -> int | None:
    m = re.search(r"\.(?:layers|block|h)\.(\d+)\.", module_path)
    return int(m.group(1)) if m else None


# ---- the worker ---------------------------------------------------------------------


def run_eval_job(job: EvalJob) -> dict:
    import torch

    from recycle.basemodels import load_base, resolve_base
    from recycle.routing import RoutedLoraLinear
    from recycle.scoring import predict, score_choices

    torch.set_num_threads(max(1, int(job.threads)))
    torch.manual_seed(0)
    t0 = time.time()
    plan = comp.Plan(**job.plan)
    model, tok = load_base(resolve_base(plan.base))
    handle = comp.install(plan, model, tok)
    examples = job.examples
    try:
        on_rows, chosen = comp.per_example_hook(handle, plan, examples, task=job.task)
        routed = any(isinstance(m, RoutedLoraLinear) for m in handle.layers.values())
        usage: dict[str, dict[str, float]] = {}
        tokens: dict[str, int] = {}
        if routed:
            with handle.record() as rec:
                scores = score_choices(model, tok, examples, batch_size=job.batch_size,
                                       max_length=job.max_length, on_rows=on_rows)
            # token-weighted load per module over every forward pass of this task
            for path, s in rec.stats().items():
                tokens[path] = s["tokens"]
                usage[path] = s["load"]
        else:
            scores = score_choices(model, tok, examples, batch_size=job.batch_size,
                                   max_length=job.max_length, on_rows=on_rows)
    finally:
        handle.remove()
    preds = predict(scores)
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
        "routing": usage or None,
        "per_example_experts": chosen,
        "seconds": time.time() - t0,
    }


# ---- the driver ---------------------------------------------------------------------


def task_sets(registry: Registry) -> tuple[list[str], list[str]]:
    """(held-in, held-out) task names: held-in tasks have a single-task expert."""
    from recycle.tasks import list_tasks

    tasks = [t["name"] for t in list_tasks(registry)]
    with_expert = {e["task"] for e in registry.experts() if e.get("task") and not comp.is_multitask(e)}
    return [t for t in tasks if t in with_expert], [t for t in tasks if t not in with_expert]


def choose_tasks(registry: Registry, spec: str) -> list[tuple[str, str]]:
    held_in, held_out = task_sets(registry)
    if spec == "held-out":
        chosen = held_out
    elif spec == "held-in":
        chosen = held_in
    elif spec == "all":
        chosen = held_in + held_out
    else:
        chosen = [t.strip() for t in spec.split(",") if t.strip()]
        unknown = [t for t in chosen if t not in held_in + held_out]
        if unknown:
            raise RecycleError(f"unknown task(s): {', '.join(unknown)} (see recycle tasks list)")
    if not chosen:
        raise RecycleError(f"no {spec} tasks registered (held-in: {len(held_in)}, held-out: {len(held_out)})")
    return [(t, "in" if t in held_in else "out") for t in chosen]


def _data_key(registry: Registry, task: str) -> str:
    """The task spec's hash: a changed spec means new test examples, so new results."""
    rows = list(registry.db.query("select spec_sha256 from tasks where name = ?", [task]))
    return rows[0]["spec_sha256"] if rows else ""


def plan_eval(
    registry: Registry,
    *,
    methods: list[str] | None,
    compositions: list[str] | None,
    tasks: str,
    n: int | None,
    seed: int,
    top_k: int = 2,
    batch_size: int = 16,
    threads: int = 1,
) -> tuple[list[EvalJob], list[dict]]:
    """The jobs to run and the notes on (method, task) pairs skipped (with the reason)."""
    from recycle.data import load_examples

    chosen_tasks = choose_tasks(registry, tasks)
    plans: list[tuple[str, comp.Plan]] = []
    skipped: list[dict] = []
    for c in compositions or []:
        plans.append((c, comp.plan(registry, composition=c, data_seed=seed)))
    for m in methods or []:
        if m == "multitask" and not any(comp.is_multitask(e) for e in registry.experts()):
            skipped.append({"label": m, "task": "*", "reason": "no multitask expert registered"})
            continue
        plans.append((m, comp.plan(registry, method=m, top_k=top_k, data_seed=seed)))
    jobs = []
    examples_cache: dict[str, list] = {}
    for label, p in plans:
        for task, held in chosen_tasks:
            if p.method == "oracle" and task not in {m["task"] for m in p.members}:
                skipped.append({"label": label, "task": task, "reason": "no expert for this task (held-out)"})
                continue
            if task not in examples_cache:
                examples_cache[task] = load_examples(registry, task, "test", n=n, seed=seed)
                if not examples_cache[task]:
                    raise RecycleError(f"task {task}: empty test split")
            exs = examples_cache[task]
            key = hashlib.sha256(
                json.dumps([EVAL_FORMAT, p.settings_hash, p.base, task, _data_key(registry, task), n, seed],
                           sort_keys=True).encode()
            ).hexdigest()
            jobs.append(EvalJob(label, p.to_dict(), task, held, exs, batch_size=batch_size, threads=threads,
                                key=key, settings_hash=p.settings_hash, member_hashes=p.member_hashes,
                                n=len(exs), seed=seed))
    return jobs, skipped


def stored_result(registry: Registry, key: str) -> dict | None:
    rows = list(registry.db.query(
        "select * from eval_results where key = ? order by id desc limit 1", [key]))
    return _decode(rows[0]) if rows else None


def _decode(row: dict) -> dict:
    row = dict(row)
    for k in ("routing", "member_hashes", "predictions"):
        if row.get(k):
            row[k] = json.loads(row[k])
    return row


def start_run(registry: Registry, settings: dict) -> int:
    with registry.transaction() as db:
        return db["eval_runs"].insert({"created": now(), "settings": encode_json(settings), "status": "running"}).last_pk


def finish_run(registry: Registry, run_id: int, status: str, seconds: float) -> None:
    with registry.transaction() as db:
        db["eval_runs"].update(run_id, {"status": status, "seconds": seconds})


def record_result(registry: Registry, run_id: int, job: EvalJob, result: dict, reused_from: int | None = None) -> dict:
    row = {
        "run_id": run_id,
        "key": job.key,
        "label": job.label,
        "method": job.plan["method"],
        "settings_hash": job.settings_hash,
        "member_hashes": encode_json(job.member_hashes),
        "task": job.task,
        "held": job.held,
        "n": result["n"],
        "seed": job.seed,
        "correct": result["correct"],
        "accuracy": result["accuracy"],
        "ci_low": result["ci_low"],
        "ci_high": result["ci_high"],
        "routing": encode_json(result["routing"]) if result.get("routing") else None,
        "predictions": encode_json(result.get("predictions")) if result.get("predictions") is not None else None,
        "seconds": result.get("seconds"),
        "reused_from": reused_from,
        "created": now(),
    }
    with registry.transaction() as db:
        row["id"] = db["eval_results"].insert(row).last_pk
    return _decode(row)


def run_rows(registry: Registry, run_id: int) -> list[dict]:
    return [_decode(r) for r in registry.db.query("select * from eval_results where run_id = ? order by id", [run_id])]


def get_run(registry: Registry, run_id: int) -> dict:
    rows = list(registry.db.query("select * from eval_runs where id = ?", [run_id]))
    if not rows:
        raise RecycleError(f"no evaluation run {run_id}")
    row = dict(rows[0])
    row["settings"] = json.loads(row["settings"])
    return row


def summarise(rows: list[dict]) -> dict:
    """Methods x tasks accuracy table plus held-out average and S/U/H."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    held = {r["task"]: r["held"] for r in rows}
    tasks = sorted(held, key=lambda t: (held[t] != "in", t))  # held-in first, then held-out
    table = {}
    for label in labels:
        acc = {r["task"]: r["accuracy"] for r in rows if r["label"] == label}
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
    return {"tasks": tasks, "held": held, "methods": table}


def fmt(x) -> str:
    """An accuracy (or any float) with three decimals; blank for None or NaN."""
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The results table of :func:`summarise` as (header, rows of formatted cells): methods
    as rows; tasks, held-in and held-out averages, and S/U/H where the run mixes both."""
    tasks = summary["tasks"]
    has_suh = any("H" in m for m in summary["methods"].values())
    head = ["method"] + [f"{t} ({summary['held'][t]})" for t in tasks] + ["held-in avg", "held-out avg"]
    keys = ["S", "U", "H"] if has_suh else []
    body = [
        [label] + [fmt(m["tasks"].get(t)) for t in tasks] + [fmt(m["held_in_avg"]), fmt(m["held_out_avg"])]
        + [fmt(m.get(k)) for k in keys]
        for label, m in summary["methods"].items()
    ]
    return head + keys, body


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
    for ti, r in enumerate(routed):
        mods = r["routing"]
        for path, loads in mods.items():
            for e, v in loads.items():
                te[ti][experts.index(e)] += v / len(mods)
            li = layer_of(path)
            if li is not None:
                k = layers.index(li)
                for e, v in loads.items():
                    le[k][experts.index(e)] += v
                lcount[k] += 1
    le = [[v / max(lcount[k], 1) for v in row] for k, row in enumerate(le)]
    return {"label": label, "experts": experts, "tasks": tasks, "layers": layers,
            "task_expert": te, "layer_expert": le}


def plot_routing(mats: dict, path) -> None:
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise RecycleError(f"cannot write {path}: its folder does not exist")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6 + 0.5 * len(mats["experts"]), 2 + 0.3 * max(len(mats["tasks"]), len(mats["layers"]) / 2)))
    for ax, key, rows, title in (
        (axes[0], "task_expert", mats["tasks"], "task × expert"),
        (axes[1], "layer_expert", [str(x) for x in mats["layers"]], "layer × expert"),
    ):
        im = ax.imshow(mats[key], aspect="auto", cmap="viridis", vmin=0)
        ax.set_xticks(range(len(mats["experts"])), mats["experts"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_title(f"{mats['label']}: {title} (share of tokens)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = os.fspath(path)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
