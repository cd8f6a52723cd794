"""A composition on EleutherAI's lm-evaluation-harness tasks, one Ray task per (composition,
task), stored as a recycle evaluation run.

The driver (:func:`lm_evaluate`) plans the composition (a stored one, or a method over
experts) as ``recycle eval`` does, submits one job per harness task through
:mod:`recycle.cluster`, and records each (sub)task's per-example results as an eval result
of one run, so ``recycle eval runs``, ``eval show`` (``--compare``, ``--examples``) and
``eval export`` read them like any other. The worker (:func:`run_lmeval_job`) loads the base
model, puts the plan's scorer behind the harness (:class:`recycle.lmeval_model.RecycleLM`)
and runs ``lm_eval.simple_evaluate`` on the one task.

What is stored per harness (sub)task: ``scores`` are the log-likelihoods the harness
received for every choice of every document, ``predictions`` their argmax and
``accuracy`` the share right: the harness's own ``acc`` (no length normalisation). Its
other metrics (``acc_norm``: log-likelihood over the choice's length in characters,
``acc_bytes``: in UTF-8 bytes) are in ``extra["lm_eval"]``, with each document's id, the
hash of its prompt and its choices. ``recycle eval`` itself ranks by the mean
log-probability per token: on choices of one token each the two agree exactly.

lm-evaluation-harness is an optional dependency (``pip install -e ".[lm-eval]"``), imported
only here, inside functions.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from recycle import cluster
from recycle.console import Reporter
from recycle.errors import RecycleError
from recycle.registry import Registry
from recycle.results import PER_EXAMPLE_EXTRA, prompt_id

LM_EVAL_VERSION = "0.4.13"  # the version pyproject.toml's [lm-eval] extra pins
INSTALL_HINT = ('lm-evaluation-harness is not installed: pip install -e ".[lm-eval]" '
                f'(or pip install "lm-eval=={LM_EVAL_VERSION}")')
FORMAT = "lm-eval/1"


def require_lm_eval() -> str:
    """The installed lm-eval version, or a one-line error saying how to install it."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        found = version("lm_eval")
        import lm_eval  # noqa: F401
    except (ImportError, PackageNotFoundError):
        raise RecycleError(INSTALL_HINT) from None
    return found


@dataclass(frozen=True)
class LMEvalRequest:
    """What to run on the harness, with which resources."""

    tasks: tuple[str, ...]
    composition: str | None = None
    method: str | None = None  # an ad-hoc method ("phatgoose", "single NAME") over `experts`
    experts: tuple[str, ...] = ()
    include_path: str | None = None  # a folder of task YAMLs (lm-eval's --include_path)
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 16
    cpus_per_task: float = 1.0
    gpus_per_task: float | None = None
    address: str | None = None
    dtype: str = "float32"  # --dtype; "auto" resolved by lm_evaluate() before anything is keyed

    def __post_init__(self):
        if bool(self.composition) == bool(self.method):
            raise RecycleError("give a stored composition (NAME) or --method, not both and not neither")
        if not self.tasks:
            raise RecycleError("--tasks: name at least one lm-eval task")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise RecycleError(f"--num-fewshot must be at least 0, not {self.num_fewshot}")
        if self.limit is not None and self.limit < 1:
            raise RecycleError(f"--limit must be at least 1, not {self.limit}")
        if self.batch_size < 1:
            raise RecycleError(f"--batch-size must be at least 1, not {self.batch_size}")
        if not self.cpus_per_task > 0:
            raise RecycleError(f"--cpus-per-task must be positive, not {self.cpus_per_task}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise RecycleError(f"--include-path {self.include_path}: not a folder")

    def record(self, version: str) -> dict:
        return {"lm_eval": version, "composition": self.composition, "method": self.method,
                "experts": list(self.experts), "tasks": list(self.tasks), "include_path": self.include_path,
                "num_fewshot": self.num_fewshot, "limit": self.limit}


@dataclass
class LMEvalJob(cluster.Job):
    """One (composition, harness task) for a worker, as plain data (threads and device set
    by :func:`recycle.cluster.run`)."""

    label: str
    plan: dict  # methods.Plan as a dict
    task: str
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 16
    key_parts: list = field(default_factory=list)


@dataclass
class LMEvalOutcome:
    run_id: int
    failures: list[str]
    results: dict  # lm-eval's own results JSON, merged over the tasks


def _jsonable(value):
    """lm-eval's results as plain JSON data (its configs may hold functions)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable))


def check_task(task) -> None:
    kind = getattr(task, "OUTPUT_TYPE", None)
    if kind != "multiple_choice":
        name = getattr(task, "config", None) and task.config.task
        raise RecycleError(f"lm-eval task {name}: output type {kind}; recycle lm-eval scores multiple_choice "
                           "tasks only (rank classification)")


def _gold(sample: dict) -> int | None:
    """The gold choice index of a harness sample (its target: an index, or the answer's
    text); None where it names several or none."""
    target, choices = sample["target"], [a[1] for a in sample["arguments"]]
    if isinstance(target, bool):
        return None
    if isinstance(target, int):
        return target if 0 <= target < len(choices) else None
    if isinstance(target, str):
        if target.strip().isdigit() and int(target) < len(choices):
            return int(target)
        for form in (target, " " + target):
            if form in choices:
                return choices.index(form)
    return None


def run_lmeval_job(job: LMEvalJob) -> dict:
    """The harness on one task with the plan's model behind it (worker side). Returns
    lm-eval's results JSON and, per leaf task, its per-document results."""
    import logging

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from recycle import methods
    from recycle.basemodels import load_base, resolve_base
    from recycle.evaluation import routing_cost
    from recycle.lmeval_model import RecycleLM
    from recycle.methods import Plan
    from recycle.stats import wilson

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, int(job.threads)))
    torch.manual_seed(0)
    t0 = time.time()
    plan = Plan.from_dict(job.plan)
    model, tok = load_base(resolve_base(plan.base), dtype=job.dtype)
    device = cluster.device(job.device)
    model.to(device)
    manager = TaskManager(include_path=job.include_path, include_defaults=False) if job.include_path else None
    if manager is None or job.task not in manager.all_tasks:  # indexing lm-eval's own tasks takes seconds
        manager = TaskManager(include_path=job.include_path)
    if job.task not in manager.all_tasks:
        raise RecycleError(f"unknown lm-eval task {job.task!r}" + ("" if job.include_path else
                           " (a local task file: --include-path FOLDER)"))
    for t in manager.load([job.task])["tasks"].values():
        check_task(t)
    max_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    lm = RecycleLM(plan, model, tok, batch_size=job.batch_size, max_length=min(max_length, 4096))
    try:
        out = simple_evaluate(model=lm, tasks=[job.task], num_fewshot=job.num_fewshot, limit=job.limit,
                              task_manager=manager, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    finally:
        lm.close()
    stats: dict = {}
    for call in lm.calls:
        for path, s in (call["scored"].stats or {}).items():
            stats.setdefault(path, []).append(s)
    per_doc: dict[tuple, dict] = {}  # per-example routing the scorer reports (COSMO's p_seen...), by document
    for call in lm.calls:
        scored = call["scored"]
        lists = {k: v for k, v in scored.extra.items() if k in PER_EXAMPLE_EXTRA and isinstance(v, list)}
        if scored.experts is not None:
            lists["experts"] = scored.experts
        for i, key in enumerate(call["keys"]):
            per_doc[key[:2]] = {k: v[i] for k, v in lists.items()}
    per_task = {}
    for name, samples in (out.get("samples") or {}).items():
        samples = sorted(samples, key=lambda s: s["doc_id"])
        scores = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        preds = [max(range(len(sc)), key=sc.__getitem__) for sc in scores]
        labels = [_gold(s) for s in samples]
        correct = sum(int(p == y) for p, y in zip(preds, labels))
        lo, hi = wilson(correct, len(samples))
        contexts = [s["arguments"][0][0] if s["arguments"] else "" for s in samples]
        metrics = {k: v for k, v in (out["results"].get(name) or {}).items() if k != "alias"}
        per_task[name] = {
            "n": len(samples), "correct": correct, "accuracy": correct / len(samples) if samples else float("nan"),
            "ci_low": lo, "ci_high": hi, "predictions": preds, "scores": scores, "labels": labels,
            "extra": {"lm_eval": _jsonable(metrics), "doc_ids": [s["doc_id"] for s in samples],
                      "prompt_ids": [prompt_id(c) for c in contexts],
                      "choices": [[a[1] for a in s["arguments"]] for s in samples]},
        }
        for k in sorted({k for s in samples for k in per_doc.get((name, s["doc_id"]), {})}):
            per_task[name]["extra"][k] = [per_doc.get((name, s["doc_id"]), {}).get(k) for s in samples]
    results = _jsonable({k: v for k, v in out.items() if k != "samples"})
    merged = merge_stats(stats)
    if methods.get(plan.method).token_routed and merged:
        for r in per_task.values():
            r["extra"].update(routing_cost(merged))
    return {"results": results, "tasks": per_task, "seconds": time.time() - t0,
            "routing": {path: s["load"] for path, s in merged.items()} or None}


def merge_stats(stats: dict) -> dict:
    """Per routed module, the routing statistics of several scorer calls as one: ``load``
    (each expert's share of tokens) and ``lora_products`` weighted by the calls' tokens."""
    out = {}
    for path, entries in stats.items():
        w = [float(e.get("tokens", 1) or 1) for e in entries]
        total = sum(w) or 1.0
        loads: dict[str, float] = {}
        for weight, e in zip(w, entries):
            for name, v in e["load"].items():
                loads[name] = loads.get(name, 0.0) + v * weight / total
        out[path] = {"tokens": sum(w), "load": loads,
                     "lora_products": sum(e.get("lora_products", 0.0) * x / total for e, x in zip(entries, w))}
    return out


def _dir_hash(folder: str | None) -> str | None:
    """What a folder of task files holds (names and bytes), for result keys."""
    if not folder:
        return None
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def lm_evaluate(registry: Registry, request: LMEvalRequest, report: Reporter | None = None) -> LMEvalOutcome:
    """Run the harness (see the module docstring); returns the run id, failures (one line
    each) and lm-eval's results merged over the tasks."""
    from recycle import compose as comp
    from recycle.results import task_sets

    report = report or Reporter()
    version = require_lm_eval()
    registry.check_writable()
    registry.mark_dead_runs()
    if request.composition:
        plan = comp.plan(registry, composition=request.composition)
    else:
        plan = comp.plan(registry, method=request.method, experts=list(request.experts) or None)
    folder = str(Path(request.include_path).resolve()) if request.include_path else None
    files = _dir_hash(folder)
    dtype = cluster.resolve_dtype(request.dtype, request.gpus_per_task)
    jobs = [LMEvalJob(plan.label, plan.to_dict(), t, folder, request.num_fewshot, request.limit, request.batch_size,
                      key_parts=[FORMAT, version, plan.content_key, plan.base, files, request.num_fewshot,
                                 request.limit] + ([dtype] if dtype != "float32" else []), dtype=dtype)
            for t in dict.fromkeys(request.tasks)]
    held_in = set(task_sets(registry)[0])
    merged: dict = {}
    failures: list[str] = []
    t0 = time.time()
    run_id = registry.start_run(request.record(version))

    def fail(job, reason):
        failures.append(f"{job.label} on {job.task}: {reason}")
        report.fail(f"{job.label} on {job.task}: {reason}")

    def on_result(job, res):
        _merge(merged, res["results"])
        for name, r in res["tasks"].items():
            key = hashlib.sha256(json.dumps(job.key_parts + [name], sort_keys=True).encode()).hexdigest()
            registry.record_result({
                "run_id": run_id, "key": key, "label": job.label, "method": plan.method,
                "settings_hash": plan.content_key, "member_hashes": plan.member_hashes, "task": name,
                "held": "in" if name in held_in else "out", "seed": 0, "reused_from": None,
                "routing": res["routing"], "seconds": res["seconds"], "dtype": dtype, "memory": res.get("memory"),
                **{k: r[k] for k in ("n", "correct", "accuracy", "ci_low", "ci_high", "predictions",
                                     "scores", "labels", "extra")}})
            report.ok(f"{job.label} on {name}: acc {r['accuracy']:.3f} [{r['ci_low']:.3f}, "
                      f"{r['ci_high']:.3f}] n={r['n']}, {res['seconds']:.1f} s")

    with registry.recording_run(run_id, t0, failures):
        cluster.run(run_lmeval_job, jobs, cluster.Resources(num_cpus=request.cpus_per_task,
                                                            num_gpus=request.gpus_per_task),
                    "lm-eval", on_result, on_error=fail, what=f"lm-eval {version}: {plan.label} on {len(jobs)} task(s)",
                    address=request.address, report=report)
    merged["recycle"] = {"run": run_id, "label": plan.label, "method": plan.method,
                         "content_key": plan.content_key}
    return LMEvalOutcome(run_id, failures, merged)


def _merge(into: dict, part: dict) -> None:
    """lm-eval results JSON of one task into the merged one: per-task dicts merged, the rest
    (its ``config``, versions of the code) kept from the first."""
    for k, v in part.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict) and k != "config":
            into[k].update(v)
        else:
            into.setdefault(k, v)
