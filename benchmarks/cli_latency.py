"""How fast the CLI answers: wall time of read-only commands at N registered experts.

N real PEFT LoRA adapters (rank 4 on q_proj and v_proj of the tiny random Llama, each with
its own random weights, written by PEFT's ``save_pretrained``) are registered through the
real command, ``recycle add-expert DIR --recursive`` (validation, hashing, one registry
write each). Then each command runs ``--reps`` times as a fresh process
(``python -m recycle ...``, stdout to a pipe): the median wall time and the CPU seconds of
the median run. ``--compare DIR`` runs the same commands from another checkout (its own
``.venv``, e.g. the code before a change) in turn with this one, on the same registry, so
both see the same load. The registry and adapters are kept under ``--work`` (default
``~/.cache/recycle-bench/cli-N``) and reused.

    python benchmarks/cli_latency.py --experts 1000 --reps 7 --compare /work/main

Results: benchmarks/results/cli-latency.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from moepp import cpu_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COMMANDS = (["--help"], ["experts", "list"], ["experts", "list", "--json"], ["experts", "show", "e0000"],
            ["tasks", "list"], ["compose", "list"], ["gates", "list"], ["eval", "runs"])


def make_adapters(folder: Path, n: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from recycle.basemodels import resolve_base

    have = sorted(p for p in folder.glob("e*") if (p / "adapter_model.safetensors").is_file())
    if len(have) >= n:
        return have[:n]
    model = AutoModelForCausalLM.from_pretrained(resolve_base("tiny-llama").path)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    out = []
    for i in range(n):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        peft_model.save_pretrained(folder / f"e{i:04d}")
        out.append(folder / f"e{i:04d}")
    return out


def timed(python: str, cwd: Path, args: list[str], env: dict) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and exit code of one fresh ``recycle ARGS``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    code = subprocess.run([python, "-m", "recycle", *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--compare", type=Path, default=None, help="another checkout (with .venv) to time in turn")
    args = ap.parse_args()
    if args.experts < 1 or args.reps < 1:
        ap.error("--experts and --reps must be at least 1")
    work = args.work or Path.home() / ".cache" / "recycle-bench" / f"cli-{args.experts}"
    work.mkdir(parents=True, exist_ok=True)
    db = work / "registry.db"
    env = {**os.environ, "RECYCLE_DB": str(db), "COLUMNS": "160"}

    from recycle.registry import Registry

    if len(Registry(db).experts()) < args.experts:
        make_adapters(work / "adapters", args.experts)
        t0 = time.perf_counter()
        add = subprocess.run([sys.executable, "-m", "recycle", "add-expert", str(work / "adapters"), "--recursive",
                              "--base", "tiny-llama"], env=env, capture_output=True, text=True)
        if add.returncode != 0:
            sys.exit(add.stderr)
        print(f"registered {args.experts} experts in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    n = len(Registry(db).experts())

    here = Path(__file__).resolve().parent.parent
    sides = {"this checkout": (sys.executable, here)}
    if args.compare:
        sides[f"{args.compare}"] = (str(args.compare / ".venv" / "bin" / "python"), args.compare.resolve())
    rows = []
    for cmd in COMMANDS:
        runs = {side: [] for side in sides}
        for _ in range(args.reps):
            for side, (python, cwd) in sides.items():
                runs[side].append(timed(python, cwd, cmd, env))
        for side, got in runs.items():
            got.sort()
            if any(code != 0 for _, _, code in got):
                sys.exit(f"recycle {' '.join(cmd)} failed ({side})")
            wall, cpu, _ = got[len(got) // 2]
            rows.append((" ".join(cmd), side, wall, cpu, got[0][0], got[-1][0]))
            print(f"recycle {' '.join(cmd)} ({side}): median {wall:.3f} s wall, {cpu:.2f} CPU-s", file=sys.stderr)

    command = "python benchmarks/cli_latency.py " + shlex.join(sys.argv[1:])
    lines = [
        "# CLI latency",
        "",
        f"`{command}` on {cpu_name()} (a machine shared with other work: medians of "
        f"{args.reps} runs; load average at the end {os.getloadavg()[0]:.1f}). {n} experts registered through "
        "`recycle add-expert DIR --recursive` (real PEFT adapters, rank 4, tiny Llama). Each command is a fresh "
        "`python -m recycle` process; the checkouts take turns.",
        "",
        "| command | code | median wall (s) | CPU-s (median run) | fastest (s) | slowest (s) |",
        "|---|---|---|---|---|---|",
        *[f"| `recycle {c}` | {side} | {w:.3f} | {cpu:.2f} | {lo:.3f} | {hi:.3f} |" for c, side, w, cpu, lo, hi in rows],
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cli-latency.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
