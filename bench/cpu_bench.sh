#!/usr/bin/env bash
# The CPU benchmarks with their defaults, on a quiet machine (about 15 minutes on 2 cores):
#   bench/cpu_bench.sh              # throughput (full-size backbone, N=512) + cost scaling
#   N=256 bench/cpu_bench.sh        # fewer images: quicker, fixed costs weigh more
# Tables go to stdout; logs and JSON to $BENCH_OUT (default /tmp/inctrl-bench-results).
# Paste the printed Markdown rows into bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${INCTRL_VENV:-$PWD/.venv}/bin/python"
out="${BENCH_OUT:-/tmp/inctrl-bench-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$PY" -m bench.throughput --n "${N:-512}" --json "$out/throughput.json" 2>&1 \
  | tee "$out/throughput.log"
"$PY" -m bench.scaling --json "$out/scaling.json" 2>&1 | tee "$out/scaling.log"
echo "logs and JSON in $out"
