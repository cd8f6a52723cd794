#!/usr/bin/env bash
# The GPU path on one CUDA GPU, in at most 8 minutes (issue 27, item 5):
#   1. bf16 routing on CUDA: grouped_mm against the padded-block path, outputs equal
#      (benchmarks/gpu_routing.py, N = 32 and 128);
#   2. PHATGOOSE gates for the demo's experts, 0.25 GPU each, bfloat16;
#   3. an evaluation on the GPU (base and phatgoose, held-out tasks), bfloat16;
#   4. one served request (recycle serve on the GPU, one POST /v1/score).
# Writes benchmarks/results/gpu.md (with the GPU's name) and gpu.json.
#
#   bash benchmarks/gpu_check.sh             # RECYCLE_DB: a registry holding the demo's experts
#
# Steps 2-4 need the demo's registry (`recycle demo` run before, its caches with it: the
# GPU machine may have no network). Without CUDA it stops at once, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
RESULTS=benchmarks/results
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
SERVE_PID=""
cleanup() {
  if [ -n "$SERVE_PID" ]; then kill "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
started=$(date +%s)
say() { echo "gpu_check: $*" >&2; }
fail() { say "$*"; exit 2; }

GPU=$("$PY" -c 'import torch, sys
if not torch.cuda.is_available():
    sys.exit("torch %s sees no CUDA device" % torch.__version__)
print(torch.cuda.get_device_name(0))') || fail "needs a CUDA GPU that torch sees (nothing was run)"
say "GPU: $GPU"
unset RECYCLE_ALLOW_CPU_FALLBACK  # a task given the GPU must compute on it

# 1. routing kernels, bf16
timeout 240 "$PY" benchmarks/gpu_routing.py --experts 32,128 --out "$WORK/routing.json" \
  || fail "routing on CUDA failed (see above)"

# 2-4 on the demo's registry
"$PY" -m recycle experts list --json > "$WORK/experts.json" 2>/dev/null \
  || fail "no registry with the demo's experts (RECYCLE_DB=${RECYCLE_DB:-default}); run recycle demo first"
n_experts=$("$PY" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$WORK/experts.json")
[ "$n_experts" -gt 0 ] || fail "the registry has no experts; run recycle demo first"

timeout 150 "$PY" -m recycle train-gates --all --gpus-per-expert 0.25 --dtype bfloat16 --force --json \
  > "$WORK/gates.json" || fail "train-gates on the GPU failed"
timeout 150 "$PY" -m recycle eval --methods base,phatgoose --tasks held-out -n 100 --gpus-per-task 1 \
  --dtype bfloat16 --force --json > "$WORK/eval.json" || fail "eval on the GPU failed"

PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PY" -m recycle serve phatgoose --port "$PORT" --gpus-per-replica 0.25 --dtype bfloat16 > "$WORK/serve.log" 2>&1 &
SERVE_PID=$!
for _ in $(seq 1 90); do
  curl -sf "http://127.0.0.1:$PORT/healthz" > /dev/null 2>&1 && break
  kill -0 "$SERVE_PID" 2>/dev/null || fail "recycle serve exited: $(tail -3 "$WORK/serve.log")"
  sleep 1
done
t0=$(date +%s.%N)
curl -sf "http://127.0.0.1:$PORT/v1/score" -d '{"composition": "phatgoose", "prompt": "Review: great!\nSentiment:", "choices": [" positive", " negative"]}' \
  > "$WORK/served.json" || fail "the served request failed: $(tail -3 "$WORK/serve.log")"
t1=$(date +%s.%N)
"$PY" -c "import json; print(json.dumps({'seconds': $t1 - $t0}))" > "$WORK/served_time.json"

mkdir -p "$RESULTS"
"$PY" - "$WORK" "$GPU" "$(( $(date +%s) - started ))" <<'EOF'
import json, sys
from pathlib import Path
work, gpu, wall = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
r = json.loads((work / "routing.json").read_text())
gates = json.loads((work / "gates.json").read_text())
ev = json.loads((work / "eval.json").read_text())
served = json.loads((work / "served.json").read_text())
served_s = json.loads((work / "served_time.json").read_text())["seconds"]
out = {"gpu": gpu, "wall_s": wall, "routing": r, "gates": gates, "eval": {k: ev[k] for k in ("run", "summary")},
       "eval_results": [{k: x.get(k) for k in ("label", "task", "accuracy", "dtype", "memory", "seconds")}
                        for x in ev["results"]], "served": served, "served_s": served_s}
Path("benchmarks/results/gpu.json").write_text(json.dumps(out, indent=2) + "\n")
lines = [f"# The GPU path on {gpu}", "", f"`bash benchmarks/gpu_check.sh`, {wall} s in all, bfloat16.", "",
         f"## Routing on CUDA (batch {r['batch'][0]} x {r['batch'][1]} tokens, top {r['routed_layers']} layers)", "",
         "| N experts | dispatch | grouped_mm ran | base (s) | grouped_mm (s) | padded blocks (s) | max abs diff | equal |",
         "| ---: | :--- | :--- | ---: | ---: | ---: | ---: | :--- |"]
for x in r["rows"]:
    lines.append(f"| {x['n_experts']} | {x['dispatch']} | {x['grouped_mm_ran']} | {x['base_s']:.4f} | "
                 f"{x['grouped_mm_s']:.4f} | {x['padded_blocks_s']:.4f} | {x['max_abs_diff']:.3g} | {x['equal']} |")
experts = gates.get("experts", gates if isinstance(gates, list) else [])
lines += ["", f"## Gates, 0.25 GPU each: {len(experts)} experts", "",
          "| expert | status | seconds | peak RSS (MiB) | CUDA peak (MiB) |", "| --- | --- | ---: | ---: | ---: |"]
for e in experts:
    m = e.get("memory") or {}
    lines.append(f"| {e.get('expert')} | {e.get('status')} | {e.get('seconds') or 0:.1f} | {m.get('peak_rss_mib', '')} | "
                 f"{m.get('cuda_peak_mib', '')} |")
lines += ["", "## Evaluation on the GPU", "", "| method | task | accuracy | seconds | peak RSS (MiB) | CUDA peak (MiB) |",
          "| --- | --- | ---: | ---: | ---: | ---: |"]
for x in out["eval_results"]:
    m = x.get("memory") or {}
    lines.append(f"| {x['label']} | {x['task']} | {x['accuracy']:.3f} | {x['seconds']:.1f} | "
                 f"{m.get('peak_rss_mib', '')} | {m.get('cuda_peak_mib', '')} |")
lines += ["", f"## One served request: {served_s:.3f} s", "", "```json", json.dumps(served)[:600], "```"]
Path("benchmarks/results/gpu.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
say "done in $(( $(date +%s) - started )) s: benchmarks/results/gpu.md"
