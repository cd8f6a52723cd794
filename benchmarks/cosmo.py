"""COSMO over the quality benchmark's experts: the gate, its ablations, and far tasks.

On the quality benchmark's registry (benchmarks/quality/run.sh), a COSMO composition over
the eight held-in experts (seen side: the identified expert; unseen side: ``--unseen``, by
default Arrow over the members as ``recycle compose NAME --method cosmo`` builds it, or
``method:phatgoose`` for PHATGOOSE top-2, each mixed with the base model where routing does
not help) has its gate trained by leaving
experts out (``train-cosmo-gate``: 4 folds, 100 validation examples per member task), then is
evaluated on the benchmark's twelve tasks (n = 400, seed 0) and on two far tasks that no
expert resembles (``us_timezone``, ``mfd_foundation``: n = 300). Every other method's results
are the stored ones of the same examples (computed if missing).

Ablations, from the per-example pieces the one COSMO evaluation stores: the seen side
alone, the unseen side alone (routing, and routing mixed with the base model), a hard gate,
the soft gate without smoothing, constant smoothing, adaptive smoothing without the base
fallback, and adaptive smoothing (COSMO). Paired tests (McNemar per task, paired bootstrap
over tasks) against PHATGOOSE and against the best other method by H that uses no oracle.

    RECYCLE_DB=benchmarks/quality/registry.db python benchmarks/cosmo.py

Results: benchmarks/results/cosmo.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from moepp import HELD_IN, HELD_OUT, RESULTS, cpu_name  # noqa: E402

FAR = ["us_timezone", "mfd_foundation"]
BASELINES = ["base", "uniform", "arrow", "avg-activation", "retrieval", "phatgoose", "oracle", "multitask"]


def run_eval(registry, *, methods=(), compositions=(), tasks, n):
    from recycle import evaluation as E
    from recycle.console import QUIET

    outcome = E.evaluate(registry, E.EvalRequest(methods=tuple(methods), compositions=tuple(compositions),
                                                 tasks=",".join(tasks), n=n, seed=0, cpus_per_task=1), QUIET)
    if outcome.failures:
        raise SystemExit(f"evaluation failed: {outcome.failures[0]}")
    return registry.run_results(outcome.run_id)


def ablations(rows: list[dict], gate: dict, side: str) -> dict[str, dict[str, list[bool]]]:
    """Per variant, per task, per-example correctness, recomputed from COSMO's stored pieces."""
    from recycle.methods.cosmo import combine, probs

    theta, temp = gate["theta"]["top1"], gate["temperature"]["top1"]
    out: dict[str, dict[str, list[bool]]] = {}
    for r in rows:
        e = r["extra"]
        for i, y in enumerate(r["labels"]):
            ps, pr = probs(e["seen_scores"][i]), probs(e["routed_scores"][i])
            pb = probs(e["base_scores"][i]) if e.get("base_scores") else pr
            q, g = e["q"][i], e["g"][i]
            pu = q * pr + (1 - q) * pb
            variants = {
                "seen side alone (identified expert)": ps,
                f"unseen side alone: {side}": pr,
                f"unseen side alone: {side} + base fallback": pu,
                "hard gate": combine(ps, pu, g, theta, temp, "none", "hard")[0],
                "soft gate, no smoothing": combine(ps, pu, g, theta, temp, "none")[0],
                "soft gate, constant smoothing (γ 0.5)": combine(ps, pu, g, theta, temp, "constant")[0],
                "adaptive smoothing, no base fallback": combine(ps, pr, g, theta, temp, "adaptive")[0],
                "COSMO: adaptive smoothing": combine(ps, pu, g, theta, temp, "adaptive")[0],
            }
            for name, p in variants.items():
                out.setdefault(name, {}).setdefault(r["task"], []).append(int(p.argmax()) == y)
    return out


def summary_of(per_task: dict[str, list[bool]]) -> dict:
    from recycle.stats import suh

    acc = {t: sum(v) / len(v) for t, v in per_task.items()}
    ins = [acc[t] for t in HELD_IN if t in acc]
    outs = [acc[t] for t in HELD_OUT if t in acc]
    far = [acc[t] for t in FAR if t in acc]
    return {"tasks": acc, "held_in": sum(ins) / len(ins) if ins else None,
            "held_out": sum(outs) / len(outs) if outs else None, "far": sum(far) / len(far) if far else None,
            **(suh(ins, outs) if ins and outs else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--n-far", type=int, default=300)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--unseen", default="method:arrow", choices=["method:arrow", "method:phatgoose"],
                    help="COSMO's unseen side (default: the product's, Arrow over the members)")
    ap.add_argument("--out", default=str(RESULTS / "cosmo"))
    args = ap.parse_args()
    out = Path(args.out)
    if not out.parent.is_dir():
        ap.error(f"--out {out}: its folder does not exist")

    from recycle import cluster, compose
    from recycle import evaluation as E
    from recycle.console import Reporter
    from recycle.files import write_json, write_text
    from recycle.methods.cosmo import GateTrainSettings, train_gate
    from recycle.registry import Registry
    from recycle.stats import mcnemar, paired_bootstrap, wilson
    from recycle.tasks import add_task, catalogue_spec

    registry = Registry(create=False)
    report = Reporter()
    t0 = time.time()
    for t in FAR:
        add_task(registry, catalogue_spec(t))
    experts = [e.name for e in registry.experts() if e.task in HELD_IN]
    with cluster.connect(None):
        compose.create(registry, "cosmo", "cosmo", experts, {"unseen": args.unseen}, replace=True)
        gate = train_gate(registry, "cosmo", GateTrainSettings(folds=args.folds, examples=args.examples),
                          report=report, cpus=2.0)
        base_rows = run_eval(registry, methods=BASELINES, tasks=HELD_IN + HELD_OUT, n=args.n)
        cosmo_rows = run_eval(registry, compositions=["cosmo"], tasks=HELD_IN + HELD_OUT, n=args.n)
        far_rows = run_eval(registry, methods=["base", "uniform", "arrow", "phatgoose"], tasks=FAR, n=args.n_far)
        far_cosmo = run_eval(registry, compositions=["cosmo"], tasks=FAR, n=args.n_far)
    main_summary = E.summarise(base_rows + cosmo_rows)
    correct = {}
    for r in base_rows + cosmo_rows + far_rows + far_cosmo:
        correct.setdefault(r["label"], {})[r["task"]] = E.correct_of(r)
    side = args.unseen.removeprefix("method:").replace("phatgoose", "PHATGOOSE").replace("arrow", "Arrow")
    variants = ablations(cosmo_rows + far_cosmo, gate, side)
    table = {label: summary_of(per_task) for label, per_task in correct.items()}
    table.update({f"ablation: {k}": summary_of(v) for k, v in variants.items()})
    oracle_free = {k: v for k, v in table.items() if k in BASELINES and k not in ("oracle",) and v.get("H") is not None}
    best_other = max(oracle_free, key=lambda k: oracle_free[k]["H"])

    def paired(a: str, b: str) -> dict:
        res = {"tasks": {}}
        for group, tasks in (("held-in", HELD_IN), ("held-out", HELD_OUT), ("far", FAR)):
            pairs = [(correct[a][t], correct[b][t]) for t in tasks if t in correct[a] and t in correct[b]]
            for t in tasks:
                if t in correct[a] and t in correct[b]:
                    res["tasks"][t] = mcnemar(correct[a][t], correct[b][t])
            if pairs:
                res[group] = paired_bootstrap(pairs)
        return res

    tests = {k: paired("cosmo", k) for k in dict.fromkeys(["phatgoose", "arrow", "multitask", best_other])}
    far_base_ci = {t: wilson(sum(correct["base"][t]), len(correct["base"][t])) for t in FAR}
    data = {"command": "python benchmarks/cosmo.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "cpu": cpu_name(), "unseen": args.unseen, "seconds": time.time() - t0, "n": args.n, "n_far": args.n_far,
            "gate": {k: gate.get(k) for k in ("metrics", "theta", "temperature", "folds", "settings")},
            "test_gate": main_summary.get("gates", {}).get("cosmo"), "table": table, "paired": tests,
            "best_oracle_free": best_other, "far_base_ci": far_base_ci}
    write_json(out.with_suffix(".json"), data)

    def f(x):
        return "" if x is None else f"{x:.3f}"

    lines = [f"Command: `{data['command'].strip()}` ({data['seconds']:.0f} s on {data['cpu']})", "",
             f"COSMO's unseen side: {side} over the eight members (`--unseen {args.unseen}`).", "",
             "| method | held-in avg | held-out avg | S | U | H | far avg | " + " | ".join(FAR) + " |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(FAR)]
    order = [k for k in BASELINES if k in table] + ["cosmo"] + [k for k in table if k.startswith("ablation")]
    for k in order:
        v = table[k]
        lines.append(f"| {k} | {f(v['held_in'])} | {f(v['held_out'])} | {f(v.get('S'))} | {f(v.get('U'))} | "
                     f"{f(v.get('H'))} | {f(v['far'])} | " + " | ".join(f(v['tasks'].get(t)) for t in FAR) + " |")
    g = data["test_gate"] or {}
    m = gate["metrics"]
    lines += ["", f"Gate on the test tasks: seen/unseen AUC {f(g.get('auc'))}, ECE {f(g.get('ece'))} (of its P(seen); of the "
                  f"combination's seen weight 1 − p_U {f(g.get('weight_ece'))}). On the "
                  f"{len(gate['folds'])} leave-experts-out folds: AUC {f(m['top1']['auc'])}, fold H {f(m['top1']['H'])} "
                  f"with the identified expert as the seen side, {f(m['posterior']['H'])} with the top-3 mixed by the "
                  f"posterior; {m['far_examples']} pseudo-unseen examples where routing and base disagreed trained "
                  "the base fallback.", ""]
    for other, res in tests.items():
        for group in ("held-in", "held-out", "far"):
            if group in res:
                p = res[group]
                lines.append(f"COSMO − {other}, {group}: {p['diff']:+.3f} (95% CI [{p['ci_low']:+.3f}, "
                             f"{p['ci_high']:+.3f}], paired bootstrap p = {p['p']:.3g})")
    lines += ["", "Far tasks, base model 95% Wilson intervals: " + ", ".join(
        f"{t} [{lo:.3f}, {hi:.3f}]" for t, (lo, hi) in far_base_ci.items())]
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
