#!/usr/bin/env bash
# bf16 vs fp32 on the quality benchmark's held-out tasks (issue 27 item 3)
set -e
cd "$(dirname "$0")/../.."
export RECYCLE_DB=$PWD/benchmarks/quality/registry.db
M=base,uniform,arrow,avg-activation,retrieval,phatgoose,multitask,spectr
T=rt_sentiment,vader_amazon,vader_nyt,word_valence
for d in ${DTYPES:-float32 bfloat16}; do
  s=$(date +%s)
  .venv/bin/recycle eval --methods $M --tasks $T -n 400 --seed 0 --dtype $d --force --json > benchmarks/results/precision-quality-$d.json 2> "${TMPDIR:-/tmp}/precision-quality-$d.err"
  echo "$d: $(( $(date +%s) - s )) s wall, load $(cut -d' ' -f1-3 /proc/loadavg)" >> benchmarks/results/precision-quality-times.txt
done
