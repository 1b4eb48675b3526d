#!/usr/bin/env bash
# Build (and push) the worker image with the Beam and Python versions of the submitting venv.
#   deploy/build_image.sh IMAGE [docker build flags...]
#   e.g. deploy/build_image.sh europe-west4-docker.pkg.dev/my-proj/beam/inctrl-beam:2024-05-01
# PUSH=0 builds only; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for CPU workers.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
IMAGE="${1:?usage: deploy/build_image.sh IMAGE [docker build flags...]}"
shift
PYTHON="${INCTRL_VENV:-$REPO/.venv}/bin/python"
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
BEAM_VERSION="$("$PYTHON" -c 'import apache_beam; print(apache_beam.__version__)')"
ARGS=(--build-arg "PY_VERSION=$PY_VERSION" --build-arg "BEAM_VERSION=$BEAM_VERSION")
[ -n "${TORCH_INDEX_URL:-}" ] && ARGS+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
cd "$REPO"
docker build -f deploy/Dockerfile "${ARGS[@]}" -t "$IMAGE" "$@" .
if [ "${PUSH:-1}" = "1" ]; then
  docker push "$IMAGE"
fi
