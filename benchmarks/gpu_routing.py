"""bfloat16 routing on CUDA: the sparse dispatch's ``grouped_mm`` path against its padded
blocks (``bmm``), same model, same batch, outputs compared. Part of benchmarks/gpu_check.sh.

    python benchmarks/gpu_routing.py --experts 32,128 --out /tmp/gpu_routing.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routing import PROJ, positive_ints, smollm2_shape, write_experts  # noqa: E402

from recycle.methods import build_routed_model  # noqa: E402


@torch.inference_mode()
def timed(model, batch, reps: int) -> tuple[torch.Tensor, float]:
    out = model(**batch).logits  # warm-up (and the output compared)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        model(**batch)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return out.float(), best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=positive_ints, default="32,128")
    ap.add_argument("--layers", type=int, default=8, help="route the top L layers")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_routing.py: torch sees no CUDA device")
    dtype = getattr(torch, args.dtype)
    model = smollm2_shape()
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers - args.layers, n_layers))
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).cuda()}
    base = copy.deepcopy(model).to("cuda", dtype)
    _, base_s = timed(base, batch, args.reps)
    del base
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.experts:
            folders = write_experts(model, Path(tmp) / f"n{n}", n, layers, 8, seed=n)
            gates = {name: {f"model.layers.{i}.{blk}.{p}": torch.randn(
                model.get_submodule(f"model.layers.{i}.{blk}.{p}").in_features, generator=g)
                for i in layers for blk, ps in PROJ.items() for p in ps} for name in folders}
            routed = copy.deepcopy(model).to("cuda", dtype)
            handle = build_routed_model(routed, folders, "phatgoose", top_k=2, gates=gates)
            mods = list(handle.layers.values())
            dispatch = sorted({"dense" if m.dense else "sparse" for m in mods})
            grouped_out, grouped_s = timed(routed, batch, args.reps)
            used_grouped = all(m._use_grouped_mm for m in mods)  # still on: grouped_mm ran (it falls back if not)
            for m in mods:
                m._use_grouped_mm = False
            blocks_out, blocks_s = timed(routed, batch, args.reps)
            diff = (grouped_out - blocks_out).abs().max().item()
            scale = blocks_out.abs().max().item()
            rows.append({"n_experts": n, "dispatch": "+".join(dispatch), "grouped_mm_ran": used_grouped,
                         "base_s": base_s, "grouped_mm_s": grouped_s, "padded_blocks_s": blocks_s,
                         "max_abs_diff": diff, "max_abs_logit": scale,
                         "equal": bool(torch.allclose(grouped_out, blocks_out, rtol=2e-2, atol=2e-2 * scale)),
                         "argmax_agreement": (grouped_out.argmax(-1) == blocks_out.argmax(-1)).float().mean().item()})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            handle.remove()
            del routed, handle
    result = {"gpu": torch.cuda.get_device_name(0), "dtype": args.dtype, "batch": [args.batch, args.seq],
              "routed_layers": args.layers, "torch": torch.__version__, "rows": rows,
              "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not all(r["equal"] for r in rows):
        raise SystemExit("gpu_routing.py: grouped_mm and padded blocks disagree: " + json.dumps(rows))
    return result


if __name__ == "__main__":
    main()
