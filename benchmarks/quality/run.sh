#!/usr/bin/env bash
# The quality benchmark: pipelines/benchmark.toml (8 held-in experts trained here, 4
# held-out real tasks, every SPEC-1 baseline, up to 400 test examples a task) on its own
# registry, benchmarks/quality/registry.db (not committed). Results go to
# benchmarks/results/quality.{json,md,png}. Resumable: run it again after a crash.
#
#   ./setup.sh && benchmarks/quality/run.sh            # local Ray
#   benchmarks/quality/run.sh --address HEAD_IP:6379   # a cluster
set -euo pipefail
cd "$(dirname "$0")/../.."
export RECYCLE_DB="${RECYCLE_DB:-$PWD/benchmarks/quality/registry.db}"
start=$(date +%s)
.venv/bin/recycle run pipelines/benchmark.toml "$@"
echo "quality benchmark: $(( $(date +%s) - start )) s wall" >&2
