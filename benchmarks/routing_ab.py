"""One row of the routing benchmark for one checkout: the routed model's forward against the
base model's, CPU time, for A/B runs of two versions of recycle back to back.

    python benchmarks/routing_ab.py CODE_DIR N LAYERS BATCH [--reps 8]

CODE_DIR: a checkout of recycle (its package and its ``benchmarks/routing.py`` are imported
from there, e.g. a ``git worktree`` of an older commit); N experts (rank 8, k=2, PHATGOOSE
gates drawn at random) on the 7 projections of the top LAYERS layers of a SmolLM2-135M-shaped
model, BATCH sequences of 64 tokens, 2 threads. The routed and base forwards take turns;
the ratio of their minimum CPU times is appended to ``benchmarks/results/routing-ab.txt``
with the CPU model. Run the two checkouts alternately, a few times each.
"""

import argparse
import copy
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "routing-ab.txt"
sys.path.insert(0, str(HERE))
from moepp import cpu_name  # noqa: E402  (imports no recycle: CODE_DIR's is imported below)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("code", type=Path)
    ap.add_argument("n", type=int)
    ap.add_argument("layers", type=int)
    ap.add_argument("batch", type=int)
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args()
    for what in ("n", "layers", "batch", "reps"):
        if getattr(args, what) < 1:
            ap.error(f"{what.upper() if what != 'reps' else '--reps'} must be at least 1, not {getattr(args, what)}")
    code = args.code.resolve()
    if not (code / "recycle" / "__init__.py").is_file() or not (code / "benchmarks" / "routing.py").is_file():
        sys.exit(f"routing_ab.py: {code} holds no recycle checkout (recycle/__init__.py, benchmarks/routing.py)")
    sys.path[:0] = [str(code), str(code / "benchmarks")]
    warnings.filterwarnings("ignore")
    import torch
    from routing import PROJ, smollm2_shape, write_experts

    import recycle
    if not recycle.__file__.startswith(str(code)):
        sys.exit(f"routing_ab.py: imported recycle from {recycle.__file__}, not {code}")
    try:
        from recycle.routing import build_routed_model  # the code before the redesign
    except ImportError:
        from recycle.methods import build_routed_model
    torch.set_num_threads(2)
    model = smollm2_shape()
    n_layers = model.config.num_hidden_layers
    if args.layers > n_layers:
        ap.error(f"LAYERS {args.layers}: the model has {n_layers}")
    layers = list(range(n_layers - args.layers, n_layers))
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, model.config.vocab_size, (args.batch, 64), generator=g)}
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_experts(model, Path(tmp), args.n, layers, 8, seed=args.n)
        names = [f"model.layers.{i}.{block}.{p}" for i in layers for block, ps in PROJ.items() for p in ps]
        gates = {f: {m: torch.randn(model.get_submodule(m).in_features, generator=g) for m in names} for f in folders}
        routed = copy.deepcopy(model)
        build_routed_model(routed, folders, "phatgoose", top_k=2, gates=gates)
        models = {"base": model, "routed": routed}
        cpu = {k: [] for k in models}
        with torch.inference_mode():
            for m in models.values():
                m(**batch)
            for _ in range(args.reps):
                for k, m in models.items():
                    t = time.process_time()
                    m(**batch)
                    cpu[k].append(time.process_time() - t)
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip() or "?"
    line = (f"{commit} modules={len(layers) * 7} N={args.n} tokens={args.batch * 64}: base {min(cpu['base']):.3f} CPU-s, "
            f"routed/base {min(cpu['routed']) / min(cpu['base']):.3f} (min of {args.reps}; {cpu_name()})")
    print(line)
    with RESULTS.open("a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
