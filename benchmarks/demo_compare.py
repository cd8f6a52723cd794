"""Compare two kept `recycle demo` folders (`KEEP=1 bash benchmarks/demo_cpu.sh LABEL [CODE_DIR]`):
the adapters (SHA-256), the gates (every tensor, and the file metadata but the training
seconds), and every stored evaluation result with its per-example predictions, scores,
labels and routing. Exit 1 when anything differs.

    python benchmarks/demo_compare.py FOLDER_A FOLDER_B
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import torch
from safetensors import safe_open

RESULT_COLUMNS = ["method", "task", "held", "n", "correct", "accuracy", "predictions", "scores", "labels", "routing"]


def gates(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "seconds"}
        return {"meta": meta, "tensors": {k: f.get_tensor(k) for k in f.keys()}}


def snapshot(folder: str) -> dict:
    root = Path(folder)
    db = sqlite3.connect(root / "registry.db")
    out: dict = {f"expert {n}": sha for n, sha in db.execute("select name, sha256 from experts order by name")}
    for f in sorted((root / "registry.artifacts" / "gates").rglob("*.safetensors")):
        out[f"gates {f.relative_to(root)}"] = gates(f)
    rows = db.execute(f"select run_id, label, {', '.join(RESULT_COLUMNS)} from eval_results order by run_id, label, task")
    for r in rows:
        out[f"result run {r[0]} {r[1]} {r[3]}"] = dict(zip(RESULT_COLUMNS, r[2:]))
    return out


def same(a, b) -> bool:
    if isinstance(a, dict) and "tensors" in a and isinstance(b, dict) and "tensors" in b:
        ta, tb = a["tensors"], b["tensors"]
        return a["meta"] == b["meta"] and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    return a == b


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    a, b = snapshot(sys.argv[1]), snapshot(sys.argv[2])
    differ = [k for k in sorted(a.keys() | b.keys()) if k not in a or k not in b or not same(a[k], b[k])]
    results = [v for k, v in a.items() if k.startswith("result")]
    examples = sum(len(json.loads(v["scores"] or "[]")) for v in results)
    print(f"experts {sum(k.startswith('expert') for k in a)}, gate files {sum(k.startswith('gates') for k in a)}, "
          f"result rows {len(results)} ({examples} per-example score lists): {len(differ)} differ")
    for k in differ:
        print(f"  differs: {k}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
