#!/usr/bin/env bash
# Run the job on an existing Dask cluster (dask[distributed]; pip install 'inctrl-beam[dask]').
#
#   DASK_SCHEDULER=tcp://scheduler:8786 deploy/run_dask.sh nightly --manifest M --output OUT \
#       --date 2024-05-01
#   DRY_RUN=1 deploy/run_dask.sh score ...
#
# Every Dask worker needs this package (same version) and read access to the manifest, the
# images and the output (a shared file system or object storage). DASK_PARTITIONS sets the
# number of bag partitions (default: one per worker thread).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
COMMAND="${1:?usage: deploy/run_dask.sh nightly|score --manifest URL --output URL [flags]}"
shift
case "$COMMAND" in nightly|score) ;; *) echo "unknown command $COMMAND (nightly or score)" >&2; exit 2;; esac
: "${DASK_SCHEDULER:?set DASK_SCHEDULER to the scheduler address, e.g. tcp://scheduler:8786}"
PYTHON="${LAUNCH_PYTHON:-$REPO/.venv/bin/python}"
ARGS=(--runner=DaskRunner "--dask_client_address=$DASK_SCHEDULER")
[ -n "${DASK_PARTITIONS:-}" ] && ARGS+=("--dask_npartitions=$DASK_PARTITIONS")
CMD=("$PYTHON" -m pipeline "$COMMAND" "${ARGS[@]}" "$@")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%s\n' "${CMD[@]}"
  exit 0
fi
cd "$REPO"
exec "${CMD[@]}"
