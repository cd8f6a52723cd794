"""Paired comparisons on the library benchmark's held-out tasks, and how much each rests on one task.

For a finished (or running) evaluation of ``pipelines/library.toml`` (default: the latest run
in ``benchmarks/library/registry.db``), for each candidate method against each peer (PEFT's
Arrow as recycle computes it, the multitask LoRA, PHATGOOSE): the paired bootstrap of the
held-out macro-accuracy difference (``recycle eval show RUN --compare A,B``: examples resampled
within each task), on near and far separately and together; the same with each held-out task
left out in turn (the lowest and highest difference, and the task whose removal lowers it
most); tasks won and lost at McNemar p < 0.05. Then, for every method, the far tasks where
it is below the base model at McNemar p < 0.05 (issue 30: a recommended method must have none).
Reads stored per-example results only; runs no model.

    python benchmarks/library_compare.py [--run N] [--db PATH]   # -> benchmarks/results/library-compare.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from moepp import RESULTS  # noqa: E402

from recycle.evaluation import correct_of  # noqa: E402
from recycle.registry import Registry  # noqa: E402
from recycle.results import near_far  # noqa: E402
from recycle.stats import balanced_accuracy, mcnemar, paired_bootstrap, paired_bootstrap_balanced  # noqa: E402

CANDIDATES = ["retrieval", "cosmo-arrow", "cosmo", "cosmo-families", "phatgoose", "moepp", "moepp-nores", "moepp-nores-tau0.5", "spectr"]
PEERS = ["arrow", "multitask", "phatgoose"]


def held_out_kinds(registry, rows) -> dict[str, str]:
    held = {r["task"]: r["held"] for r in rows}
    summary = near_far(registry, {"held": held, "methods": {}})
    return summary.get("near_far", {t: "far" for t, h in held.items() if h == "out"})


def pairs(rows, a, b, tasks):
    by = {(r["label"], r["task"]): r for r in rows}
    out = {}
    for t in tasks:
        ra, rb = by.get((a, t)), by.get((b, t))
        if ra and rb and correct_of(ra) is not None and correct_of(rb) is not None:
            out[t] = (correct_of(ra), correct_of(rb))
    return out


def balanced_bootstrap(rows, a, b, tasks, reps: int, seed: int = 0) -> dict | None:
    """Paired bootstrap of the macro balanced-accuracy difference, examples resampled within each task."""
    by = {(r["label"], r["task"]): r for r in rows}
    groups = [(by[(a, t)]["labels"], by[(a, t)]["predictions"], by[(b, t)]["predictions"]) for t in tasks
              if (a, t) in by and (b, t) in by and by[(a, t)].get("predictions") is not None
              and by[(b, t)].get("predictions") is not None]
    return paired_bootstrap_balanced(groups, reps=reps, seed=seed) if groups else None


def fmt(d: dict) -> str:
    return f"{100 * d['diff']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default="benchmarks/library/registry.db")
    ap.add_argument("--run", type=int, default=None, help="evaluation run (default: the latest)")
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()
    registry = Registry(args.db)
    run = args.run or max(r["id"] for r in registry.runs())
    rows = registry.run_results(run)
    kinds = held_out_kinds(registry, rows)
    labels = sorted({r["label"] for r in rows})
    lines = [f"# Library benchmark: paired comparisons on the held-out tasks (run {run})", "",
             f"Command: `python benchmarks/library_compare.py {shlex.join(sys.argv[1:])}`. Differences in points "
             f"(A − B, macro over tasks), paired bootstrap 95% intervals ({args.reps} resamples of the examples "
             "within each task); 'without one task': the difference over the held-out tasks with each left out "
             "in turn (lowest, highest, and the task whose removal lowers it most).", "",
             "| A | B | near | far | held-out | without one task: low / high (task) | tasks A won / lost (McNemar p < 0.05) |",
             "|---|---|---|---|---|---|---|"]
    out_tasks = sorted(kinds)
    for a in [c for c in CANDIDATES if c in labels]:
        for b in [p for p in PEERS if p in labels and p != a]:
            ps = pairs(rows, a, b, out_tasks)
            if not ps:
                continue
            cells = []
            for kind in ("near", "far", None):
                gs = [ps[t] for t in ps if kind is None or kinds[t] == kind]
                cells.append(fmt(paired_bootstrap(gs, reps=args.reps)) if gs else "")
            drops = {t: sum(sum(x) / len(x) - sum(y) / len(y) for u, (x, y) in ps.items() if u != t) / (len(ps) - 1)
                     for t in ps}
            low_t = min(drops, key=drops.get)
            tests = {t: mcnemar(*ps[t]) for t in ps}
            diff = {t: sum(ps[t][0]) - sum(ps[t][1]) for t in ps}
            won = sum(1 for t in ps if tests[t]["p"] < 0.05 and diff[t] > 0)
            lost = sum(1 for t in ps if tests[t]["p"] < 0.05 and diff[t] < 0)
            lines.append(f"| {a} | {b} | {cells[0]} | {cells[1]} | {cells[2]} | {100 * drops[low_t]:+.1f} / "
                         f"{100 * max(drops.values()):+.1f} (without {low_t}) | {won} / {lost} of {len(ps)} |")
    lines += ["", "Far tasks where a method is below the base model (McNemar p < 0.05):", "",
              "| method | far tasks below the base model |", "|---|---|"]
    far = [t for t in out_tasks if kinds[t] == "far"]
    for m in labels:
        if m == "base":
            continue
        ps = pairs(rows, m, "base", far)
        below = [f"{t} ({100 * (sum(x) - sum(y)) / len(x):+.1f})" for t, (x, y) in ps.items()
                 if mcnemar(x, y)["p"] < 0.05 and sum(x) < sum(y)]
        lines.append(f"| {m} | {', '.join(below) or 'none'} |")
    # the same in balanced accuracy: per far task the paired bootstrap of the balanced-accuracy
    # difference to the base model, below it where the whole 95% interval is below zero
    lines += ["", "Far tasks where a method is below the base model in balanced accuracy (paired bootstrap 95% "
              "interval below zero; the difference and its interval in points):", "",
              "| method | far tasks below the base model | its largest drop on a far task |", "|---|---|---|"]
    for m in labels:
        if m == "base":
            continue
        diffs = {t: balanced_bootstrap(rows, m, "base", [t], args.reps) for t in far}
        diffs = {t: d for t, d in diffs.items() if d}
        if not diffs:
            continue
        below = [f"{t} ({fmt(d)})" for t, d in diffs.items() if d["ci_high"] < 0]
        worst = min(diffs, key=lambda t: diffs[t]["diff"])
        lines.append(f"| {m} | {', '.join(below) or 'none'} | {worst} {fmt(diffs[worst])} |")
    # balanced accuracy (the mean over a task's classes of the share of that class answered
    # right): a method that answers one label for everything scores 1 / classes, whatever the
    # test split's balance; several held-out splits here are far from balanced
    lines += ["", "Balanced accuracy (mean recall over a task's classes; a constant answer scores 1 / classes), "
              "averaged over tasks:", "", "| method | held-in | near | far | held-out |", "|---|---:|---:|---:|---:|"]
    for m in labels:
        per = {}
        for r in rows:
            if r["label"] != m or r.get("labels") is None or r.get("predictions") is None:
                continue
            per[r["task"]] = balanced_accuracy(r["labels"], r["predictions"])
        def avg(ts):
            v = [per[t] for t in ts if t in per]
            return f"{sum(v) / len(v):.3f}" if v else ""
        held_in = [r["task"] for r in rows if r["label"] == m and r["held"] == "in"]
        lines.append(f"| {m} | {avg(held_in)} | {avg([t for t in kinds if kinds[t] == 'near'])} | "
                     f"{avg([t for t in kinds if kinds[t] == 'far'])} | {avg(list(kinds))} |")
    lines += ["", "Balanced accuracy, paired: A − B in points over the held-out tasks, bootstrap 95% interval "
              "(the same resampled examples of each task for A and B, balanced accuracy per task, mean over tasks):",
              "", "| A | B | near | far | held-out |", "|---|---|---|---|---|"]
    for a in [c for c in CANDIDATES if c in labels]:
        for b in [p for p in PEERS if p in labels and p != a]:
            cells = [balanced_bootstrap(rows, a, b, [t for t in kinds if kind is None or kinds[t] == kind], args.reps)
                     for kind in ("near", "far", None)]
            lines.append(f"| {a} | {b} | " + " | ".join(fmt(c) if c else "" for c in cells) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "library-compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
