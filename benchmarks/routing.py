"""Forward throughput of routed inference: PHATGOOSE-routed vs base model vs PEFT's Arrow.

Model: SmolLM2-135M's shape (LlamaConfig hidden 576, intermediate 1536, 30 layers, 9 heads,
3 kv heads, vocab 49152), random init from config (no download), float32, CPU.
Experts: N random rank-8 LoRA adapters on all 7 projections (q, k, v, o, gate, up, down) of
the top ``--layers`` layers (default: all 30), written to a temp folder in PEFT's format and
loaded from disk by both implementations. k = 2 for both routers.

For each N the three models (separate copies) run the same input, taking turns within each
repetition; the time of a forward is the minimum over ``--reps`` runs after one warm-up (the
least noisy estimate on a shared machine), median also reported. Results: benchmarks/results/routing.{json,md}.

    python benchmarks/routing.py            # N = 8, 32, 128; batches 2 and 8 x 128 tokens
    python benchmarks/routing.py --quick    # fewer repetitions, 64 tokens
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import ArrowConfig, LoraConfig, create_arrow_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from recycle.routing import build_routed_model

PROJ = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
RESULTS = Path(__file__).parent / "results"


def smollm2_shape() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def write_experts(model, root: Path, n: int, layers: list[int], rank: int, seed: int = 0) -> dict[str, str]:
    """N PEFT adapter folders with random non-zero A and B."""
    g = torch.Generator().manual_seed(seed)
    names = [f"{blk}.{p}" for blk, ps in PROJ.items() for p in ps]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=sorted({nm.split(".")[1] for nm in names}),
                        layers_to_transform=layers)  # fmt: skip
    folders = {}
    for i in range(n):
        tensors = {}
        for layer in layers:
            for nm in names:
                path = f"model.layers.{layer}.{nm}"
                lin = model.get_submodule(path)
                tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g) / lin.in_features**0.5
                tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.02
        folder = root / f"expert{i:03d}"
        config.save_pretrained(folder)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        folders[f"expert{i:03d}"] = str(folder)
    return folders


@torch.inference_mode()
def time_forwards(models: dict, batch, reps: int) -> dict[str, tuple[float, float]]:
    """Min and median forward time of each model, the models taking turns within each
    repetition (so load from other processes hits all of them alike)."""
    for m in models.values():  # warm-up
        m(**batch)
    times = {k: [] for k in models}
    for _ in range(reps):
        for k, m in models.items():
            start = time.perf_counter()
            m(**batch)
            times[k].append(time.perf_counter() - start)
    print({k: [round(t, 3) for t in v] for k, v in times.items()}, file=sys.stderr, flush=True)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", default="8,32,128", help="comma-separated N values")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--layers", type=int, default=30, help="route the top LAYERS layers (30 = all)")
    ap.add_argument("--batch", default="2,8", help="comma-separated batch sizes (each a row)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="--seq 64 --reps 3")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.seq, args.reps = 64, 3
    torch.set_num_threads(args.threads)
    command = "python benchmarks/routing.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    model = smollm2_shape()
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers - args.layers, n_layers))
    g = torch.Generator().manual_seed(1)
    batches = {
        b: {"input_ids": torch.randint(0, model.config.vocab_size, (b, args.seq), generator=g)}
        for b in [int(v) for v in args.batch.split(",")]
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(v) for v in args.experts.split(",")]:
            folders = write_experts(model, Path(tmp) / f"n{n}", n, layers, args.rank, seed=n)
            gates = {}
            for name in folders:
                gates[name] = {f"model.layers.{i}.{nm}": torch.randn(model.get_submodule(f"model.layers.{i}.{nm}").in_features, generator=g)
                               for i in layers for blk, ps in PROJ.items() for nm in (f"{blk}.{p}" for p in ps)}  # fmt: skip
            routed_model = copy.deepcopy(model)
            t0 = time.perf_counter()
            handle = build_routed_model(routed_model, folders, "phatgoose", top_k=args.top_k, gates=gates)
            routed_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            arrow_model = create_arrow_model(
                copy.deepcopy(model), list(folders.values()), ArrowConfig(top_k=args.top_k, rng_seed=0)
            ).eval()
            arrow_build = time.perf_counter() - t0
            for bsz, batch in batches.items():
                t = time_forwards({"base": model, "routed": routed_model, "arrow": arrow_model}, batch, args.reps)
                base, routed, arrow = t["base"], t["routed"], t["arrow"]
                row = {
                    "n_experts": n, "tokens": bsz * args.seq, "batch": bsz,
                    "base_s": base[0], "routed_s": routed[0], "arrow_s": arrow[0],
                    "base_median_s": base[1], "routed_median_s": routed[1], "arrow_median_s": arrow[1],
                    "routed_over_base": routed[0] / base[0], "arrow_over_base": arrow[0] / base[0],
                    "arrow_over_routed": arrow[0] / routed[0],
                    "build_s": {"routed": routed_build, "arrow": arrow_build},
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            handle.remove()
            del handle, routed_model, arrow_model

    setup = {
        "model": "LlamaConfig of SmolLM2-135M's shape, random init, float32",
        "routed_modules": f"q,k,v,o,gate,up,down of layers {layers[0]}-{layers[-1]} ({7 * len(layers)} modules)",
        "rank": args.rank, "top_k": args.top_k, "batches": args.batch, "seq": args.seq, "reps": args.reps,
        "threads": args.threads, "torch": torch.__version__, "timing": "min over reps after 1 warm-up, the three models taking turns",
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing.json").write_text(json.dumps({"command": command, "setup": setup, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Routed inference throughput",
        "",
        f"Command: `{command}`",
        "",
        f"Setup: {setup['model']}; experts on {setup['routed_modules']}, rank {args.rank}, k = {args.top_k}; "
        f"inputs: batch {args.batch} x {args.seq} tokens; {args.threads} threads; time = {setup['timing']} "
        f"({args.reps} reps).",
        "",
        "| N experts | tokens | base (s) | phatgoose-routed (s) | PEFT Arrow (s) | routed / base | Arrow / base "
        "| Arrow / routed |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['n_experts']} | {r['tokens']} | {r['base_s']:.3f} | {r['routed_s']:.3f} | {r['arrow_s']:.3f} | "
            f"{r['routed_over_base']:.2f} | {r['arrow_over_base']:.2f} | {r['arrow_over_routed']:.2f} |"
        )
    (args.out / "routing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
