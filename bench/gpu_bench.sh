#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) on a fresh GPU machine, offline, in under 5 minutes:
#   bench/gpu_bench.sh                       # defaults: batch 256, bf16, 4096 + 2048 images
#   bench/gpu_bench.sh --e2e-n 2048          # any bench.gpu option passes through
# Installs nothing from a network. Python: .venv if it can run the job, else python3 with the
# wheels under .whl/ installed (no index, no deps) into /tmp/site; bench/gpu_wheels.txt says
# which wheels a stock PyTorch image lacks and how to download them. Output: the table on
# stdout, and gpu_bench.log / gpu_bench.json in $OUT (or /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, apache_beam, open_clip" 2>/dev/null; then
  PY=.venv/bin/python
elif compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" - <<'EOF' || exit 2
import importlib.util, sys
need = ["torch", "torchvision", "open_clip", "ftfy", "PIL", "numpy", "pandas", "pyarrow",
        "fsspec", "safetensors", "apache_beam"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)}; put their wheels under .whl/ "
             "(see bench/gpu_wheels.txt) and carry .whl")
import torch
if not torch.cuda.is_available():
    print("note: no CUDA device visible; the benchmark runs on the CPU", file=sys.stderr)
EOF
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
set -o pipefail
# 290 s: the whole script stays under 5 minutes even if a stage hangs.
timeout 290 "$PY" -m bench.gpu --json "$out/gpu_bench.json" "$@" 2>&1 | tee "$out/gpu_bench.log"
