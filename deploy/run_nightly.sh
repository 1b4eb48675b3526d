#!/usr/bin/env bash
# The nightly inspection run on this machine (cron, systemd, by hand). One run per output at a
# time (flock); scores the date given as --date, or yesterday (UTC) by default.
#
#   deploy/run_nightly.sh                       # yesterday, settings from the environment
#   deploy/run_nightly.sh --date 2024-05-01     # a given date (backfill); --force rescores it
#   DRY_RUN=1 deploy/run_nightly.sh             # print the command instead of running it
#
# Settings (environment, or an EnvironmentFile for systemd; see nightly.env.example):
#   INCTRL_MANIFEST  manifest Parquet file or folder (required)
#   INCTRL_OUTPUT    output root (required)
#   INCTRL_VENV      virtual environment with this package (default: <repo>/.venv)
#   INCTRL_ARGS      extra flags for `python -m pipeline nightly`, e.g. "--k 4 --seeds 0,1,2
#                    --backbone ViT-B-16-plus-240 --pretrained laion400m_e32 --device cuda"
#   INCTRL_LOCK      lock file (default: /tmp/inctrl-nightly-<hash of output>.lock)
# Any argument is passed on to the job (runner flags included, e.g. --runner=DaskRunner
# --dask_client_address=tcp://scheduler:8786).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
: "${INCTRL_MANIFEST:?set INCTRL_MANIFEST to the manifest (Parquet file or folder)}"
: "${INCTRL_OUTPUT:?set INCTRL_OUTPUT to the output root}"
VENV="${INCTRL_VENV:-$REPO/.venv}"
PYTHON="$VENV/bin/python"
LOCK="${INCTRL_LOCK:-/tmp/inctrl-nightly-$(printf '%s' "$INCTRL_OUTPUT" | sha256sum | cut -c1-12).lock}"

# shellcheck disable=SC2206  # INCTRL_ARGS is a list of flags, split on spaces on purpose
EXTRA=(${INCTRL_ARGS:-})
CMD=("$PYTHON" -m pipeline nightly --manifest "$INCTRL_MANIFEST" --output "$INCTRL_OUTPUT"
     "${EXTRA[@]}" "$@")

if [ -n "${DRY_RUN:-}" ]; then
  printf '%s\n' "${CMD[@]}"
  exit 0
fi
cd "$REPO"
export PYTHONUNBUFFERED=1
# -n: if last night's run still holds the lock, fail now instead of piling up runs.
exec flock -n "$LOCK" "${CMD[@]}"
