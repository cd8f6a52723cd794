"""Benchmark: one LoRA expert on SmolLM2-135M, test accuracy before vs after, and its cost.

Registers a catalogue task in a throw-away registry, scores the base model on the task's
test split (rank classification, length-normalised log-likelihood, argmax), trains an
expert with ``recycle.training.train_expert`` (the code behind ``recycle train-expert``),
loads it back with plain ``PeftModel.from_pretrained`` and scores again.

    python benchmarks/train_expert.py --task rt_sentiment --base smollm2-135m

Writes ``benchmarks/results/train_expert.json`` and ``.md``. Not a test: minutes on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from moepp import cpu_name  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="rt_sentiment")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--n-test", type=int, default=400, help="test examples scored (sampled by --seed)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--layers", default="top8")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="dtype the base computes in, for training and both evaluations (the LoRA stays float32)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_expert"))
    args = ap.parse_args(argv)

    import torch
    from peft import PeftModel

    from recycle.basemodels import load_base, resolve_base
    from recycle.registry import Registry
    from recycle.scoring import accuracy, score_choices
    from recycle.tasks import add_task, catalogue_spec, load_examples
    from recycle.training import TrainSettings, train_expert

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    work = Path(tempfile.mkdtemp(prefix="bench-train-expert-"))
    registry = Registry(work / "registry.db")
    add_task(registry, catalogue_spec(args.task))
    test = load_examples(registry, args.task, "test", n=args.n_test, seed=args.seed)
    ref = resolve_base(args.base)

    def evaluate(model, tok) -> tuple[float, float]:
        t = time.perf_counter()
        acc = accuracy(test, score_choices(model, tok, test, batch_size=32))
        return acc, time.perf_counter() - t

    model, tok = load_base(ref, dtype=args.dtype)
    before, eval_s = evaluate(model, tok)
    print(f"base: {before:.3f} on {len(test)} test examples ({eval_s:.0f} s)", file=sys.stderr)
    del model

    settings = TrainSettings(rank=args.rank, alpha=args.alpha, layers=args.layers, steps=args.steps,
                             lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                             seed=args.seed, dtype=args.dtype)
    t0 = time.perf_counter()
    row = train_expert(registry, [args.task], args.base, settings, progress=True)
    wall = time.perf_counter() - t0
    training = json.loads((Path(row["path"]) / "training.json").read_text())

    base_model, tok = load_base(ref, dtype=args.dtype)
    model = PeftModel.from_pretrained(base_model, row["path"]).eval()
    after, _ = evaluate(model, tok)
    print(f"expert: {after:.3f}", file=sys.stderr)

    labels = [ex.label for ex in test]
    majority = max(labels.count(k) for k in set(labels)) / len(labels)
    result = {
        "task": args.task,
        "base": args.base,
        "dtype": args.dtype,
        "n_test": len(test),
        "majority_class": round(majority, 4),
        "accuracy_base": round(before, 4),
        "accuracy_expert": round(after, 4),
        "gain_points": round(100 * (after - before), 1),
        "train_loop_seconds": training["train_seconds"],
        "train_loop_cpu_seconds": training.get("train_cpu_seconds"),
        "train_expert_wall_seconds": round(wall, 1),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "seconds_per_step": round(training["train_seconds"] / args.steps, 2),
        "eval_seconds_per_pass": round(eval_s, 1),
        "final_loss": round(training["final_loss"], 4),
        "settings": training["settings"],
        "n_train_examples": training["n_train_examples"],
        "n_trainable_params": training["n_trainable_params"],
        "threads": torch.get_num_threads(),
        "machine": f"{cpu_name()}, torch {torch.__version__}",
        "command": "python benchmarks/train_expert.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))
    return result


def _markdown(r: dict) -> str:
    s = r["settings"]
    return f"""# train-expert benchmark

Command: `{r['command']}`

One LoRA expert (r={s['rank']}, alpha={s['alpha']:g}, layers {s['layers'] or 'all'}, {s['steps']} steps at
batch {s['batch_size']}, lr {s['lr']:g}) on **{r['base']}**, task **{r['task']}**; rank classification
(length-normalised log-likelihood of each choice, argmax) on {r['n_test']} test examples.

| | accuracy |
| --- | --- |
| majority class | {r['majority_class']:.3f} |
| base model | {r['accuracy_base']:.3f} |
| expert | {r['accuracy_expert']:.3f} |
| gain | **{r['gain_points']:+.1f} points** |

Training loop: {r['train_loop_seconds']:.0f} s wall ({r['seconds_per_step']} s/step, {r['threads']} threads;
{r['train_loop_cpu_seconds']:.0f} CPU-seconds over all threads, load average {r['load_average_1min_at_end']} at the end);
whole `train_expert` call (load base, train, save, register): {r['train_expert_wall_seconds']:.0f} s.
One scoring pass over the test examples: {r['eval_seconds_per_pass']:.0f} s. Final loss {r['final_loss']}.
Machine: {r['machine']}.
"""


if __name__ == "__main__":
    main()
