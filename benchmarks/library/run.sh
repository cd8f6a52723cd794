#!/usr/bin/env bash
# The library benchmark: pipelines/library.toml (36 held-in experts trained here, 6 near and
# 6 far held-out tasks, every method and ensemble plus PEFT's own Arrow, 400 test
# examples a held-out task, 100 a held-in one) on its own registry, benchmarks/library/registry.db (not committed).
# Results go to benchmarks/results/library.{json,md,png}. Hours on 2 cores (README: "A library
# of 36 experts"); resumable: run it again after a crash or Ctrl-C and it goes on from the
# last finished step.
#
#   ./setup.sh && benchmarks/library/run.sh            # local Ray
#   benchmarks/library/run.sh --address HEAD_IP:6379   # a cluster
set -euo pipefail
cd "$(dirname "$0")/../.."
export RECYCLE_DB="${RECYCLE_DB:-$PWD/benchmarks/library/registry.db}"
start=$(date +%s)
.venv/bin/recycle run pipelines/library.toml "$@"
echo "library benchmark: $(( $(date +%s) - start )) s wall" >&2
