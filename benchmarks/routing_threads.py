"""The routed forward's operations at 1 and at 2 torch threads, on this machine as it is now.

Why: a routed forward measured at 2 threads on a 2-core machine shared with other work came
out 3.74x the base model, at 1 thread ~1.5x. This times each kind of operation of one routed
module at N = 1,000 experts (r = 8, 1,024 tokens, SmolLM2-135M's widths) at 1 and 2 threads,
alternating, beside the base model's own GEMM of the same input: when every operation,
the base GEMM included, is slower at 2 threads than at 1, the machine's other load (not the
routing) sets the 2-thread ratio, and only the 1-thread ratio says what routing costs.

    python benchmarks/routing_threads.py          # -> benchmarks/results/routing-threads.md
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from moepp import RESULTS, cpu_name  # noqa: E402

from recycle.routing import kernels as K  # noqa: E402
from recycle.routing.routers import _top_k  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    T, d_in, d_out, N, r = 1024, 576, 1536, 1000, 8
    x, G = torch.randn(T, d_in), torch.randn(N, d_in)
    A, BT, W = torch.randn(N * r, d_in), torch.randn(N * r, d_out), torch.randn(d_in, d_out)
    start, ranks = torch.arange(N) * r, torch.full((N,), r)
    w, idx = torch.topk(torch.randn(T, N), 2, dim=-1)
    w = w.softmax(-1)
    out, S = torch.zeros(T, d_out), torch.randn(T, N)
    ops = {
        "base GEMM, 1024x576 @ 576x1536": lambda: x @ W,
        "scores, 1024x576 @ 576x1000": lambda: x @ G.t(),
        "top-2 of 1,000 scores (two max)": lambda: _top_k(S, 2),
        "LoRA products, CSR (k = 2, r = 8)": lambda: K.add_csr(out, x, A, BT, start, ranks, r, idx, w, False),
    }
    times: dict[str, dict[int, list[float]]] = {name: {1: [], 2: []} for name in ops}
    load = os.getloadavg()[0]
    for _ in range(3):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, f in ops.items():
                f()
                t0 = time.perf_counter()
                for _ in range(10):
                    f()
                times[name][threads].append((time.perf_counter() - t0) / 10 * 1e3)
    lines = ["# Routed-module operations at 1 and 2 threads", "",
             f"Command: `python benchmarks/routing_threads.py`. CPU: {cpu_name()}; load average "
             f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. Median of 3 rounds of 10 calls, ms.", "",
             "| operation | 1 thread | 2 threads | 2 / 1 |", "|---|---:|---:|---:|"]
    for name, t in times.items():
        one, two = sorted(t[1])[1], sorted(t[2])[1]
        lines.append(f"| {name} | {one:.2f} | {two:.2f} | {two / one:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "routing-threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
