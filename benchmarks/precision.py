"""bfloat16 against float32 on this CPU: one gate training step and one expert (LoRA)
training step of SmolLM2-135M as recycle's workers take them, an evaluation's scoring of
64 two-choice examples, the load alone, and the routing table's rows
at N = 32 and 128 (benchmarks/routing.py), each with the peak RSS of the process that ran
it (one process per measurement, as a Ray worker: the high-water mark reset at its start).

    RECYCLE_CACHE=/tmp/rc-cache python benchmarks/precision.py

At the sizes users run (1-8B), where the weights outweigh the fixed runtime (~470 MiB of
torch, transformers and Ray in every worker), the same steps on a random model of a bigger
shape, each dtype reading a checkpoint stored in its own dtype (benchmarks/make_base.py):

    python benchmarks/precision.py --base /work/bigbase/smollm2-1.7b-float32 \
        --base-bfloat16 /work/bigbase/smollm2-1.7b-bfloat16 --kinds load,eval,gate \
        --repeats 1 --batch-size 4 --no-routing --name precision-1.7b

Writes benchmarks/results/precision.json and precision.md. Not a test: timings depend on
the machine and on whatever else runs on it. Accuracy is not measured here (the quality
benchmark's ``recycle eval --dtype bfloat16`` is).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
DTYPES = ("float32", "bfloat16")
KINDS = ("load", "gate", "expert", "eval")


def one(kind: str, dtype: str, base: str, repeats: int, threads: int, batch_size: int, max_length: int) -> dict:
    """In this process: ``repeats`` steps of ``kind`` (gate | expert) after one warm-up, as
    recycle's workers take them (:func:`recycle.schedule.optimise` on ``answer_loss``);
    median seconds and this process's peak RSS. ``eval``: the base model's scoring of the 64
    examples (:func:`recycle.scoring.score_choices`, as an evaluation job scores, after a
    warm-up on 8), the seconds of one pass; ``load``: the base model's load alone."""
    from recycle import cluster

    scope = cluster.reset_peak_memory()
    import torch
    from peft import LoraConfig, get_peft_model

    from gates import TARGETS, examples  # benchmarks/gates.py
    from recycle import gates as G
    from recycle.basemodels import load_base, resolve_base
    from recycle.data import lm_batches
    from recycle.losses import answer_loss
    from recycle.schedule import optimise

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = examples(64, 0)
    t0 = time.perf_counter()
    model, tok = load_base(resolve_base(base), dtype=dtype)
    if kind in ("load", "eval"):
        from recycle.scoring import score_choices

        seconds = time.perf_counter() - t0
        if kind == "eval":
            score_choices(model, tok, data[:8], batch_size=batch_size, max_length=max_length)
            t0 = time.perf_counter()
            score_choices(model, tok, data, batch_size=batch_size, max_length=max_length)
            seconds = time.perf_counter() - t0
        return {"kind": kind, "dtype": dtype, "median_step_s": seconds, "steps_s": [seconds],
                "peak_rss": cluster.peak_memory(scope)}
    n = model.config.num_hidden_layers
    top8 = list(range(max(0, n - 8), n))  # as the experts recycle trains (--layers top8)
    if kind == "expert":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                                                 layers_to_transform=top8))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        hooks = None
    else:
        with tempfile.TemporaryDirectory() as tmp:
            peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                    layers_to_transform=top8, init_lora_weights=False))
            peft.save_pretrained(tmp)
            del peft, model
            model, tok = G.load_peft_model(base, tmp, dtype=dtype)
        hooks = G.Gates(model)
        params = hooks.parameters()
    trained_dtypes = sorted({str(p.dtype) for p in params})
    batches = lm_batches(data, tok, batch_size, max_length, 0)
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step, loss):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    last[0] = time.perf_counter()
    losses = optimise(params, lambda step, batch: answer_loss(model, batch, top_rows=True), batches, repeats + 1,
                      lr=1e-3, warmup_steps=0, device="cpu", what=kind, on_step=on_step)
    if hooks is not None:
        hooks.remove()
    return {"kind": kind, "dtype": dtype, "median_step_s": statistics.median(times[1:]), "steps_s": times,
            "losses": losses, "trained_param_dtypes": trained_dtypes, "peak_rss": cluster.peak_memory(scope)}


def run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def routing(dtype: str, experts: str, reps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "routing.py"), "--experts", experts, "--layers", "8",
               "--batch", "16", "--no-arrow", "--reps", str(reps), "--threads", str(threads), "--dtype", dtype,
               "--out", tmp]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(f"routing.py --dtype {dtype} failed:\n{out.stderr[-3000:]}")
        return json.loads((Path(tmp) / "routing.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--base-bfloat16", help="the bfloat16 steps' base (default: --base)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="steps to measure (of " + ",".join(KINDS) + ")")
    ap.add_argument("--no-routing", action="store_true", help="skip the routing rows")
    ap.add_argument("--name", default="precision", help="results file name in benchmarks/results/")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps after one warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--routing-reps", type=int, default=3)
    ap.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.dtype, args.base, args.repeats, args.threads, args.batch_size,
                             args.max_length)))
        return
    from moepp import cpu_name

    command = "python benchmarks/precision.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = time.time()
    load_at_start = round(os.getloadavg()[0], 2)
    steps, rows = [], []
    common = ["--repeats", str(args.repeats), "--threads", str(args.threads),
              "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    bases = {"float32": args.base, "bfloat16": args.base_bfloat16 or args.base}
    kinds = [k for k in KINDS if k in args.kinds.split(",")]
    if "load" not in kinds:
        kinds.insert(0, "load")  # the "above load" column needs it
    for kind in kinds:
        for dtype in DTYPES:  # one process each: its own peak RSS
            r = run(["--one", kind, "--dtype", dtype, "--base", bases[dtype], *common])
            print(f"{kind} step {dtype}: {r['median_step_s']:.3f} s, peak RSS {r['peak_rss']['peak_rss_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)
            steps.append(r)
    for dtype in () if args.no_routing else DTYPES:
        r = routing(dtype, "32,128", args.routing_reps, args.threads)
        for row in r["rows"]:
            rows.append({"dtype": dtype, **row, "peak_rss": r["setup"]["peak_rss"]})
            print(f"routing {dtype} N={row['n_experts']}: base {row['base_s']:.3f} s, routed {row['routed_s']:.3f} s",
                  file=sys.stderr, flush=True)
    loads = [load_at_start, round(os.getloadavg()[0], 2)]
    result = {"command": command, "cpu": cpu_name(), "bases": bases, "kinds": kinds, "load_average_1min": loads,
              "wall_s": round(time.time() - started), "steps": steps, "routing": rows,
              "note": "under load: other engineers' work shared the 2 cores" if max(loads) > 2.5
              else "a quiet machine"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    by = {(s["kind"], s["dtype"]): s for s in r["steps"]}
    lines = ["# bfloat16 against float32 on the CPU", "",
             f"Command: `{r['command']}` ({r['wall_s']} s on {r['cpu']}; 1-min load average "
             f"{r['load_average_1min'][0]} at the start, {r['load_average_1min'][1]} at the end: {r['note']}; "
             "peak RSS does not depend on the load, the seconds do).", "",
             f"Bases: float32 `{r.get('bases', {}).get('float32', 'smollm2-135m')}`, bfloat16 "
             f"`{r.get('bases', {}).get('bfloat16', 'smollm2-135m')}`.", "",
             "Steps: LoRA r=8 on q,k,v,o,gate,up,down of the top 8 layers, as recycle's workers train "
             "(`optimise` on `answer_loss`), median of the timed steps after one warm-up; each in its own process, "
             "whose peak RSS (VmHWM, reset at its start) is that of one worker. Trained parameters stay float32. "
             "`load`: the base model loaded alone (torch, transformers and the tokenizer in memory, the "
             "checkpoint mapped, its pages read only when used); `eval`: the base model's scoring of 64 two-choice "
             "examples as an evaluation job scores them (seconds of one pass). `above load`: each peak less its "
             "dtype's `load` peak, i.e. what the weights read and the activations add.", "",
             "| step | float32 (s) | bfloat16 (s) | bf16 / fp32 time | float32 peak RSS (MiB) | bfloat16 peak RSS (MiB) "
             "| bf16 / fp32 RSS | bf16 / fp32 above load |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    la, lb = (by[("load", d)]["peak_rss"]["peak_rss_mib"] for d in DTYPES)
    met = []
    for kind in r.get("kinds", KINDS):
        a, b = by[(kind, "float32")], by[(kind, "bfloat16")]
        ra, rb = a["peak_rss"]["peak_rss_mib"], b["peak_rss"]["peak_rss_mib"]
        above = f"{(rb - lb) / (ra - la):.2f}" if kind != "load" and ra > la else "-"
        lines.append(f"| {kind} | {a['median_step_s']:.3f} | {b['median_step_s']:.3f} | "
                     f"{b['median_step_s'] / a['median_step_s']:.2f} | {ra:.0f} | {rb:.0f} | {rb / ra:.2f} | {above} |")
        if kind != "load":
            met.append(f"{kind} {rb / ra:.2f}x ({'met' if rb / ra <= 0.6 else 'not met'})")
    lines += ["", "Target: a bfloat16 worker's peak RSS at most 0.6x float32's: " + ", ".join(met) + "."]
    if not r["routing"]:
        return "\n".join(lines) + "\n"
    lines += ["", "Routing (benchmarks/routing.py: SmolLM2-135M's shape, random init, phatgoose routing over the top 8 "
              "layers' 56 modules, k = 2, batch 16 x 64 tokens, min over reps):", "",
              "| dtype | N experts | dispatch | base (s) | routed (s) | routed / base | process peak RSS (MiB) |",
              "| --- | ---: | :--- | ---: | ---: | ---: | ---: |"]
    for row in r["routing"]:
        lines.append(f"| {row['dtype']} | {row['n_experts']} | {row['dispatch']} | {row['base_s']:.3f} | "
                     f"{row['routed_s']:.3f} | {row['routed_over_base']:.2f} | {row['peak_rss']['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
