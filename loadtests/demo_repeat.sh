#!/usr/bin/env bash
# `make demo` N times, each on a clean stack (what a newcomer gets on a clean clone), then a summary:
# how many runs deployed a new policy and how held-out listeners judged it against the previous one.
# Usage: loadtests/demo_repeat.sh [N]   (writes results/demo_runs/run<k>.json and results/demo_summary.json)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
mkdir -p results/demo_runs
for k in $(seq 1 "$runs"); do
  .venv/bin/musicrl stack down >/dev/null || true
  rm -rf .stack
  .venv/bin/musicrl stack up
  .venv/bin/musicrl experiment demo --seed "$k"
  cp results/demo.json "results/demo_runs/run$k.json"
done
.venv/bin/musicrl stack down
.venv/bin/python -m loadtests.demo results/demo_summary.json results/demo_runs/run*.json
