"""Training cost against its anchors: a train-expert step and a gate step against the plain
PEFT loop a user would write (same model, batch and threads), and the wall time of training
N experts' gates on Ray with 1 vs 2 workers.

    RECYCLE_CACHE=/tmp/rc-cache python benchmarks/gates.py --quick

Writes benchmarks/results/gates.json and gates.md. Not a test: timings depend on the
machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from recycle import cluster  # noqa: E402
from recycle import gates as G  # noqa: E402
from recycle.basemodels import load_base, resolve_base  # noqa: E402
from recycle.data import Example, lm_batches  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = "the a movie film plot actor great bad boring fun story scene music long short love hate".split()


def examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40)))
        label = rng.randint(0, 1)
        choices = [" negative", " positive"]
        out.append(Example(f"Review: {text}\nSentiment:", choices, choices[label], label, text))
    return out


def make_adapter(base: str, folder: Path, seed: int, layers: list[int] | None) -> Path:
    from peft import LoraConfig, get_peft_model

    model, _ = load_base(resolve_base(base))
    torch.manual_seed(seed)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                     layers_to_transform=layers, init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(folder)
    return folder


def timed(fn, warm: int, n: int) -> list[float]:
    for _ in range(warm):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def step_times(base: str, adapter: Path, batch: dict, warm: int, n: int, layers: list[int] | None,
               dtype: str = "float32") -> dict:
    """Median seconds of one optimiser step, on the same model, batch and threads, of:
    the plain loop a user would write (``get_peft_model``, transformers' forward with
    ``labels`` and ``.loss``, AdamW), recycle's ``train-expert`` step (the LM head, and the
    top layer's frozen MLP products, run only where an answer token is predicted), and
    recycle's gate step (the adapter frozen, one gate per LoRA module trainable). The three
    take turns within each repetition. ``dtype``: the base model's (LoRA and gates stay
    float32, as in recycle's training)."""
    from peft import LoraConfig, get_peft_model

    from recycle.losses import answer_loss

    def lora_model():
        model, _ = load_base(resolve_base(base), dtype=dtype)
        torch.manual_seed(0)
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                                                layers_to_transform=layers))
        peft.train()
        return peft, torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)

    plain, plain_opt = lora_model()
    ours, ours_opt = lora_model()
    gated, _ = G.load_peft_model(base, adapter, dtype=dtype)
    gates = G.Gates(gated)
    gate_opt = torch.optim.AdamW(gates.parameters(), lr=5e-3, weight_decay=0.0)

    def plain_step():
        loss = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    def ours_step():
        loss = answer_loss(ours, batch, top_rows=True)  # as train-expert steps
        ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        ours_opt.step()

    def gate_step():
        loss = answer_loss(gated, batch, top_rows=True)  # as gate training steps
        gate_opt.zero_grad(set_to_none=True)
        loss.backward()
        gate_opt.step()

    steps = {"plain PEFT loop": plain_step, "train-expert": ours_step, "gates": gate_step}
    for fn in steps.values():
        for _ in range(warm):
            fn()
    times = {k: [] for k in steps}
    for _ in range(n):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    gates.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "median_s": med,
        "train_expert_over_plain": med["train-expert"] / med["plain PEFT loop"],
        "gate_over_train_expert": med["gates"] / med["train-expert"],
        "gate_over_plain": med["gates"] / med["plain PEFT loop"],
        "times_s": times,
    }


def ray_wall(base: str, adapters: list[Path], data: list[Example], steps: int, batch_size: int,
             max_length: int, workers: int, out_dir: Path) -> dict:
    settings = {"steps": steps, "lr": 5e-3, "batch_size": batch_size, "max_length": max_length,
                "warmup": 0.06, "seed": 0, "weight_decay": 0.0}
    jobs = [
        G.GateJob(expert=f"e{i}", base=base, adapter_path=str(a), adapter_sha256="bench",
                  examples=data, settings=settings, out_path=str(out_dir / f"w{workers}-e{i}.safetensors"))
        for i, a in enumerate(adapters)
    ]
    results, errors = [], []
    with cluster.connect(None, num_cpus=workers):
        # one warm-up task so Ray's worker start is not counted
        cluster.run_tasks(_noop, [0] * workers, cluster.Resources(num_cpus=1), lambda j, r: None,
                          lambda j, e: errors.append(e))
        t = time.perf_counter()
        cluster.run_tasks(G.run_gate_job, jobs, cluster.Resources(num_cpus=1),
                          on_result=lambda j, r: results.append(r), on_error=lambda j, e: errors.append(e))
        wall = time.perf_counter() - t
    if errors:
        raise SystemExit(f"gate tasks failed: {errors}")
    return {"workers": workers, "wall_s": wall, "task_train_s": [r["seconds"] for r in results]}


def _noop(_):
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--step-repeats", type=int, default=5)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="gate steps per expert in the Ray run")
    ap.add_argument("--layers", default="", help="comma-separated layers the adapters adapt (default all)")
    ap.add_argument("--quick", action="store_true", help="few repeats and steps")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="dtype of the base model in the step timings")
    ap.add_argument("--steps-only", metavar="JSON", type=Path,
                    help="time the steps only (no Ray runs) and write them, with this process's peak RSS, to JSON")
    args = ap.parse_args()
    if args.quick:
        args.step_repeats, args.steps = 3, 5
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    threads = torch.get_num_threads()

    data = examples(64, 0)
    with tempfile.TemporaryDirectory(prefix="gates-bench-") as tmp:
        tmp = Path(tmp)
        adapters = [make_adapter(args.base, tmp / f"a{i}", i, layers) for i in range(args.experts)]
        _, tok = load_base(resolve_base(args.base))
        batch = next(lm_batches(data, tok, args.batch_size, args.max_length, 0))
        scope = cluster.reset_peak_memory()
        steps = step_times(args.base, adapters[0], batch, warm=1, n=args.step_repeats, layers=layers, dtype=args.dtype)
        print(f"step medians {steps['median_s']}; train-expert/plain {steps['train_expert_over_plain']:.2f}, "
              f"gate/train-expert {steps['gate_over_train_expert']:.2f}", file=sys.stderr)
        if args.steps_only:  # three models (plain, train-expert, gated) held at once: the RSS is theirs together
            args.steps_only.write_text(json.dumps({"dtype": args.dtype, "base": args.base, "threads": threads,
                                                   "batch_shape": list(batch["input_ids"].shape), "step": steps,
                                                   "peak_rss": cluster.peak_memory(scope)}, indent=2) + "\n")
            return
        runs = []
        for workers in (1, 2):
            r = ray_wall(args.base, adapters, data, args.steps, args.batch_size, args.max_length, workers, tmp)
            print(f"{workers} worker(s): {r['wall_s']:.1f} s for {args.experts} experts", file=sys.stderr)
            runs.append(r)

    result = {
        "command": "python benchmarks/gates.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "base": args.base,
        "batch_size": args.batch_size,
        "tokens_per_example_max": args.max_length,
        "batch_shape": list(batch["input_ids"].shape),
        "adapter": {"r": 8, "targets": TARGETS, "layers": layers or "all"},
        "torch_threads_step_bench": threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "step": steps,
        "ray": {"experts": args.experts, "gate_steps": args.steps, "runs": runs,
                "speedup_2_over_1": runs[0]["wall_s"] / runs[1]["wall_s"]},
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gates.json").write_text(json.dumps(result, indent=2) + "\n")
    from moepp import cpu_name

    result["cpu"] = cpu_name()
    med = steps["median_s"]
    (out / "gates.md").write_text(
        "# Gate training benchmark\n\n"
        f"Command: `{result['command']}` on {result['cpu']}, torch {torch.__version__}, "
        f"{threads} threads for the step timings.\n"
        f"Base {args.base}, LoRA r=8 on {', '.join(TARGETS)} ({'all layers' if not layers else 'layers ' + args.layers}), "
        f"batch {list(batch['input_ids'].shape)} tokens.\n\n"
        "| what | value |\n| --- | --- |\n"
        f"| plain PEFT loop step (get_peft_model, forward with labels, AdamW; median of {args.step_repeats}) | "
        f"{med['plain PEFT loop']:.3f} s |\n"
        f"| train-expert step (median) | {med['train-expert']:.3f} s |\n"
        f"| gate step (median) | {med['gates']:.3f} s |\n"
        f"| train-expert step / plain loop step | {steps['train_expert_over_plain']:.2f} |\n"
        f"| gate step / train-expert (LoRA) step | {steps['gate_over_train_expert']:.2f} |\n"
        f"| gate step / plain loop step | {steps['gate_over_plain']:.2f} |\n"
        f"| {args.experts} experts × {args.steps} gate steps, 1 Ray worker | {runs[0]['wall_s']:.1f} s |\n"
        f"| same, 2 Ray workers | {runs[1]['wall_s']:.1f} s |\n"
        f"| speed-up 2 vs 1 workers | {result['ray']['speedup_2_over_1']:.2f}× |\n\n"
        "The three steps take turns in each repetition. Wall times include each task loading the base model and "
        "the adapter; Ray's own start and worker start-up are excluded (a warm-up task per worker runs first). "
        "Each Ray task uses 1 torch thread.\n"
    )
    print(json.dumps({k: result[k] for k in ("step", "ray")}, indent=2))


if __name__ == "__main__":
    main()
