"""Forward throughput of routed inference: PHATGOOSE-routed vs base model vs PEFT's Arrow.

Model: SmolLM2-135M's shape (LlamaConfig hidden 576, intermediate 1536, 30 layers, 9 heads,
3 kv heads, vocab 49152), random init from config (no download), float32, CPU.
Experts: N random rank-8 LoRA adapters on all 7 projections (q, k, v, o, gate, up, down) of
the top L layers, written to a temp folder in PEFT's format and loaded from disk by both
implementations. ``--layers 8,30``: L = 8 is what recycle's experts adapt (DATA.md, the
demo), L = 30 every projection of every layer (210 routed modules). k = 2 for both routers.

For each (L, N) the three models (separate copies) run the same input, taking turns within
each repetition; the time of a forward is the minimum over ``--reps`` runs after one warm-up
(the least noisy estimate on a shared machine), median also reported.
Results: benchmarks/results/routing.{json,md}.

    python benchmarks/routing.py            # L = 8, 30; N = 8, 32, 128; batches 2 and 16 x 64 tokens
    python benchmarks/routing.py --quick    # 2 repetitions
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
from peft import ArrowConfig, LoraConfig, PeftModel, create_arrow_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from recycle.methods import build_routed_model
from recycle.routing import RoutedLoraLinear

sys.path.insert(0, str(Path(__file__).parent))
from moepp import cpu_name  # noqa: E402

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


def peft_arrow_model(base, folders: list[str], top_k: int, layers: list[int], n_layers: int):
    """PEFT's own Arrow model over the adapters (``create_arrow_model``). PEFT 0.21 puts the
    Arrow router on every module whose name the adapters target, ignoring their
    ``layers_to_transform``, and then fails on the modules no adapter covers (``torch.stack``
    of an empty list in ``ArrowLoraLinearLayer.build_prototypes``). When only some layers are
    adapted, the same steps as ``create_arrow_model`` are taken with the router limited to
    those layers."""
    config = ArrowConfig(top_k=top_k, rng_seed=0)
    if len(layers) == n_layers:
        return create_arrow_model(base, folders, config).eval()
    model = PeftModel.from_pretrained(base, folders[0], adapter_name="task_0")
    for i, folder in enumerate(folders[1:], 1):
        model.load_adapter(folder, adapter_name=f"task_{i}")
    config.task_adapter_names, config.gks_adapter_names = [f"task_{i}" for i in range(len(folders))], []
    adapter = LoraConfig.from_pretrained(folders[0])
    router = LoraConfig(arrow_config=config, target_modules=adapter.target_modules, r=adapter.r, layers_to_transform=layers)
    model.add_adapter(adapter_name="arrow_router", peft_config=router)
    model.set_adapter("arrow_router")
    return model.eval()


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


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return values


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=positive_ints, default="8,32,128", help="comma-separated N values")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--layers", type=positive_ints, default="8,30", help="comma-separated: route the top L layers (8: the experts "
                    "recycle trains, DATA.md; 30: every layer)")  # fmt: skip
    ap.add_argument("--batch", type=positive_ints, default="2,16", help="comma-separated batch sizes (each a row)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="--reps 2")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="dtype of the base model (the routed model computes in it; the adapters' LoRA is cast to it)")
    ap.add_argument("--no-arrow", action="store_true", help="leave PEFT's Arrow model out")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.reps = 2
    try:  # up front: a run of many minutes must not end unable to write its results
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ap.error(f"--out {args.out}: {e.strerror}")
    torch.set_num_threads(args.threads)
    command = "python benchmarks/routing.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    from recycle.cluster import peak_memory, reset_peak_memory

    scope = reset_peak_memory()
    dtype = getattr(torch, args.dtype)
    model = smollm2_shape().to(dtype)
    n_layers = model.config.num_hidden_layers
    if max(args.layers) > n_layers:
        ap.error(f"--layers: the model has {n_layers} layers")
    g = torch.Generator().manual_seed(1)
    batches = {
        b: {"input_ids": torch.randint(0, model.config.vocab_size, (b, args.seq), generator=g)}
        for b in args.batch
    }
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for n_routed in args.layers:
            layers = list(range(n_layers - n_routed, n_layers))
            for n in args.experts:
                folders = write_experts(model, Path(tmp) / f"l{n_routed}n{n}", n, layers, args.rank, seed=n)
                gates = {}
                for name in folders:
                    gates[name] = {f"model.layers.{i}.{nm}": torch.randn(model.get_submodule(f"model.layers.{i}.{nm}").in_features, generator=g)
                                   for i in layers for blk, ps in PROJ.items() for nm in (f"{blk}.{p}" for p in ps)}  # fmt: skip
                routed_model = copy.deepcopy(model)
                t0 = time.perf_counter()
                handle = build_routed_model(routed_model, folders, "phatgoose", top_k=args.top_k, gates=gates)
                routed_build = time.perf_counter() - t0
                dispatch = {("dense" if m.dense else "sparse") for m in handle.layers.values()}
                t0 = time.perf_counter()
                arrow_model = None if args.no_arrow else peft_arrow_model(
                    copy.deepcopy(model), list(folders.values()), args.top_k, layers, n_layers)
                arrow_build = time.perf_counter() - t0
                for bsz, batch in batches.items():
                    models = {"base": model, "routed": routed_model, **({"arrow": arrow_model} if arrow_model else {})}
                    t = time_forwards(models, batch, args.reps)
                    base, routed, arrow = t["base"], t["routed"], t.get("arrow", (float("nan"), float("nan")))
                    row = {
                        "routed_layers": n_routed, "routed_modules": 7 * n_routed, "n_experts": n,
                        "dispatch": "+".join(sorted(dispatch)), "tokens": bsz * args.seq, "batch": bsz,
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
        "model": f"LlamaConfig of SmolLM2-135M's shape, random init, {args.dtype}",
        "dtype": args.dtype,
        "peak_rss": peak_memory(scope),
        "experts": "random rank-%d LoRA on q,k,v,o,gate,up,down of the top L layers, PEFT folders on disk" % args.rank,
        "rank": args.rank, "top_k": args.top_k, "batches": ",".join(map(str, args.batch)), "seq": args.seq, "reps": args.reps,
        "threads": args.threads, "torch": torch.__version__,
        "timing": "min over reps after 1 warm-up, the three models taking turns",
        "wall_s": round(time.time() - started),
        "cpu": cpu_name(),
    }  # fmt: skip
    (args.out / "routing.json").write_text(json.dumps({"command": command, "setup": setup, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Routed inference throughput",
        "",
        f"Command: `{command}` ({setup['wall_s']} s on {setup['cpu']})",
        "",
        f"Setup: {setup['model']}; {setup['experts']}; k = {args.top_k}; inputs: batch {setup['batches']} x "
        f"{args.seq} tokens; {args.threads} threads; torch {torch.__version__}; time = {setup['timing']} "
        f"({args.reps} reps). Dispatch: the routed layer's choice (dense up to N·r = "
        f"{RoutedLoraLinear.dense_limit('cpu', dtype)}, "
        f"sparse above: sparse-dense products on CPU).",
        "",
        "| routed modules | N experts | dispatch | tokens | base (s) | phatgoose-routed (s) | PEFT Arrow (s) "
        "| routed / base | Arrow / base | Arrow / routed |",
        "| ---: | ---: | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['routed_modules']} | {r['n_experts']} | {r['dispatch']} | {r['tokens']} | {r['base_s']:.3f} | "
            f"{r['routed_s']:.3f} | {r['arrow_s']:.3f} | {r['routed_over_base']:.2f} | {r['arrow_over_base']:.2f} | "
            f"{r['arrow_over_routed']:.2f} |"
        )
    (args.out / "routing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
