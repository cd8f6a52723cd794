#!/bin/bash
# The demo's compute: `recycle demo` in an empty folder, timed by the CPU time of the whole
# machine (/proc/stat: user, nice, system, irq, softirq), so that Ray's own processes and
# every worker count; run it on an otherwise idle machine (the model conversion cached first).
#
#   bash benchmarks/demo_cpu.sh LABEL [CODE_DIR]      (KEEP=1: keep the demo's folder)
#
# CODE_DIR: another checkout of recycle to time instead (its package first on PYTHONPATH,
# this venv's packages), e.g. a `git worktree` of an older commit. Appends one line to
# benchmarks/results/demo-cpu.txt with the CPU model and the pipeline's own step times.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
label=${1:?usage: demo_cpu.sh LABEL [CODE_DIR]}
code=${2:-$here}
# a wrong CODE_DIR would silently time this venv's installed recycle instead
[ -f "$code/recycle/__init__.py" ] || { echo "demo_cpu.sh: $code holds no recycle package (recycle/__init__.py)" >&2; exit 2; }
work=$(mktemp -d)
# an interrupted or failed run leaves no folder and writes no line; KEEP=1 keeps a finished
# run's folder (its registry and result tables) and names it
trap 'rm -rf "$work"' EXIT
log="$work/demo.log"
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
b0=$(busy); t0=$(date +%s.%N)
(cd "$work" && PYTHONPATH="$code" "$here/.venv/bin/python" -m recycle demo) > "$log" 2>&1
b1=$(busy); t1=$(date +%s.%N)
hz=$(getconf CLK_TCK)
cpu=$(cd "$here/benchmarks" && "$here/.venv/bin/python" -c 'from moepp import cpu_name; print(cpu_name())')
steps=$(grep -E "^ +(experts|gates|evaluation [0-9]+) done|pipeline .*: done in" "$log" | sed 's/^ *//; s/;.*//' | paste -sd ',' -)
line="$label: $(git -C "$code" rev-parse --short HEAD 2>/dev/null || echo '?') wall $(echo "$t1 - $t0" | bc | cut -d. -f1) s, CPU $(( (b1 - b0) / hz )) s ($cpu); $steps"
echo "$line" | tee -a "$here/benchmarks/results/demo-cpu.txt"
if [ "${KEEP:-0}" = 1 ]; then trap - EXIT; echo "kept: $work"; fi
