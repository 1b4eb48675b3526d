#!/usr/bin/env bash
# Sets itself up on first use (see run_local.sh), then runs the whole test suite on the CPU.
# Extra arguments go to pytest, e.g. ./run_tests.sh -k residual
set -euo pipefail
cd "$(dirname "$0")"
./run_local.sh --setup test
# One worker per core, each test module whole on one worker (its module-scoped job runs once).
exec "${INCTRL_VENV:-$PWD/.venv}/bin/python" -m pytest -q -p no:cacheprovider \
  -n "${INCTRL_TEST_WORKERS:-auto}" --dist loadfile "$@" tests
