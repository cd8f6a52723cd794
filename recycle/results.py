"""Per-example results of an evaluation run, out of the registry: one row per (example,
method) for ``recycle eval export`` and ``recycle eval show --examples``.

A row: ``run``, ``method`` (the label in the run's table), ``task``, ``held``,
``example_id``, ``prompt_id``, ``choices``, ``scores`` (every choice's score as stored),
``prediction`` and ``label`` (choice indices), ``correct`` and ``routing``.

- ``recycle eval`` results: ``example_id`` is the example's index in its task's test split
  (validation split for a run with ``--split validation``)
  (stable whatever ``-n``), ``prompt_id`` a hash of its prompt text; the choices come from
  the task as registered, re-read for the run's seeded sample (checked against the stored
  labels: a task whose data changed since leaves them empty).
- ``recycle lm-eval`` results: lm-eval's document id, a hash of the context the harness
  built, and the choices it asked about (stored with the result).

``routing`` is what recycle keeps: per example where it has it (the expert a per-example
method chose: ``expert``; COSMO's ``p_seen``, ``seen_expert`` and ``q``), and per (method,
task) otherwise: ``expert_share`` (each expert's share of tokens, averaged over the routed
modules) and ``lora_products`` (LoRA products per token per routed module) for
token-routed methods.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

from recycle.errors import RecycleError
from recycle.registry import Registry

FORMATS = ("jsonl", "csv", "parquet")
COLUMNS = ("run", "method", "task", "held", "example_id", "prompt_id", "choices", "scores", "prediction", "label",
           "correct", "routing")
PER_EXAMPLE_EXTRA = ("experts", "p_seen", "seen_expert", "q")


def prompt_id(text: str) -> str:
    """A short stable id of a prompt's text."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _job_routing(row: dict) -> dict:
    out = {}
    if row.get("routing"):
        mods = row["routing"]
        share: dict[str, float] = {}
        for loads in mods.values():
            for e, v in loads.items():
                share[e] = share.get(e, 0.0) + v / len(mods)
        out["expert_share"] = {e: round(v, 4) for e, v in sorted(share.items())}
    extra = row.get("extra") or {}
    if extra.get("lora_products") is not None:
        out["lora_products"] = round(extra["lora_products"], 4)
    return out


def run_split(registry: Registry, run_id: int) -> str:
    """The split a run scored: its record's ``split`` (``eval --split validation``), else test."""
    settings = registry.run(run_id).get("settings") or {}
    return settings.get("split", "test") if isinstance(settings, dict) else "test"


def _sample(registry: Registry, row: dict, split: str = "test"):
    """(example ids, prompt ids, choices) of a ``recycle eval`` result, from the task as
    registered; None where the task is gone or its examples no longer match."""
    from recycle.tasks import load_examples

    try:
        full = load_examples(registry, row["task"], split)
        sample = load_examples(registry, row["task"], split, n=row["n"], seed=row["seed"] or 0)
    except RecycleError:
        return None
    if len(sample) != row["n"] or (row.get("labels") is not None and [e.label for e in sample] != row["labels"]):
        return None
    index = {}
    for i, e in enumerate(full):
        index.setdefault((e.prompt, tuple(e.choices or ()), e.answer), i)
    return ([index.get((e.prompt, tuple(e.choices or ()), e.answer)) for e in sample],
            [prompt_id(e.prompt) for e in sample], [e.choices for e in sample])


def example_rows(registry: Registry, run_id: int, task: str | None = None) -> list[dict]:
    """One row per (example, method) of a run (of one task if given); see the module
    docstring."""
    split = run_split(registry, run_id)
    results = [r for r in registry.run_results(run_id) if task is None or r["task"] == task]
    if task is not None and not results:
        tasks = sorted({r["task"] for r in registry.run_results(run_id)})
        raise RecycleError(f"run {run_id} has no results for task {task!r} (it has: {', '.join(tasks) or 'none'})")
    samples: dict = {}
    out = []
    for r in results:
        if r.get("scores") is None:
            raise RecycleError(f"run {run_id}: {r['label']} on {r['task']} was stored without per-example scores "
                               "(evaluate again with --force)")
        extra = r.get("extra") or {}
        if "doc_ids" in extra:  # recycle lm-eval
            ids, pids, choices = extra["doc_ids"], extra["prompt_ids"], extra["choices"]
        else:
            if r["task"] not in samples:
                samples[r["task"]] = _sample(registry, r, split) or ([None] * r["n"],) * 3
            ids, pids, choices = samples[r["task"]]
        job = _job_routing(r)
        for i, (scores, pred, label) in enumerate(zip(r["scores"], r["predictions"], r["labels"])):
            routing = {k: extra[k][i] for k in PER_EXAMPLE_EXTRA if isinstance(extra.get(k), list)}
            routing.update(job)
            out.append({"run": run_id, "method": r["label"], "task": r["task"], "held": r["held"],
                        "example_id": ids[i], "prompt_id": pids[i], "choices": choices[i], "scores": scores,
                        "prediction": pred, "label": label, "correct": pred == label, "routing": routing or None})
    return out


def task_sets(registry: Registry) -> tuple[list[str], list[str]]:
    """(held-in, held-out) task names: held-in tasks have a single-task expert."""
    tasks = [t["name"] for t in registry.tasks()]
    with_expert = {e.task for e in registry.experts() if e.task and not e.multitask}
    return [t for t in tasks if t in with_expert], [t for t in tasks if t not in with_expert]


def task_families(registry: Registry, tasks) -> dict[str, str | None]:
    """Each task's family as its registered spec names it (None: no family, or the task is
    gone)."""
    out = {}
    for t in tasks:
        row = registry.task_or_none(t)
        spec = (row or {}).get("spec")
        out[t] = spec.get("family") if isinstance(spec, dict) else None
    return out


def add_near_far(summary: dict, families: dict[str, str | None], seen: set | None = None) -> dict:
    """Split a summary's held-out tasks into near (a held-in task shares its family: one of
    the run's, or of the families in ``seen``) and far (none does; a task without a family is
    far), and add each method's ``held_out_near_avg`` and ``held_out_far_avg``. Unchanged
    where no task has a family."""
    held = summary["held"]
    if not any(families.get(t) for t in held):
        return summary
    seen = ({families.get(t) for t in held if held[t] == "in"} | set(seen or ())) - {None}
    kinds = {t: ("near" if families.get(t) in seen else "far") for t in held if held[t] == "out"}
    summary["near_far"] = kinds
    summary["families"] = {t: families.get(t) for t in held}
    for entry in summary["methods"].values():
        for kind in ("near", "far"):
            accs = [a for t, a in entry["tasks"].items() if kinds.get(t) == kind]
            entry[f"held_out_{kind}_avg"] = sum(accs) / len(accs) if accs else None
    return summary


def near_far(registry: Registry, summary: dict, *more: dict) -> dict:
    """:func:`add_near_far` with the families of every held-in task of the registry (those
    with a single-task expert, as an evaluation calls a task held-in) beside the run's own,
    so a run of held-out tasks alone still tells near from far. Summaries of the same run in
    ``more`` (another metric) are split with the same lookup; returns ``summary``."""
    held_in = task_sets(registry)[0]
    tasks = set(held_in).union(*(s["held"] for s in (summary, *more)))
    families = task_families(registry, sorted(tasks))
    for s in (summary, *more):
        add_near_far(s, families, {families[t] for t in held_in})
    return summary


def _cell(v):
    return json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v)


def render(rows: list[dict], fmt: str) -> str:
    """Rows as JSON lines or CSV text (lists and dicts as JSON in a CSV cell)."""
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_cell(r[c]) for c in COLUMNS])
        return buf.getvalue()
    raise RecycleError(f"--format {fmt}: as text only jsonl or csv")


def write(rows: list[dict], fmt: str, path: str | Path) -> Path:
    """Rows to ``path`` in ``fmt`` (jsonl, csv or parquet), written atomically."""
    from recycle.files import atomic_path, write_text

    if fmt not in FORMATS:
        raise RecycleError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt != "parquet":
        return write_text(path, render(rows, fmt))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise RecycleError("parquet needs pyarrow (pip install pyarrow); or use --format jsonl or csv") from None
    schema = pa.schema([("run", pa.int64()), ("method", pa.string()), ("task", pa.string()), ("held", pa.string()),
                        ("example_id", pa.int64()), ("prompt_id", pa.string()), ("choices", pa.list_(pa.string())),
                        ("scores", pa.list_(pa.float64())), ("prediction", pa.int64()), ("label", pa.int64()),
                        ("correct", pa.bool_()), ("routing", pa.string())])
    table = pa.Table.from_pylist([{**r, "routing": json.dumps(r["routing"]) if r["routing"] else None}
                                  for r in rows], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))
    return Path(path)
