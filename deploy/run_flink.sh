#!/usr/bin/env bash
# Submit the job to an Apache Flink cluster through Beam's portable runner.
#
#   FLINK_MASTER=flink-jobmanager:8081 WORKER_IMAGE=REGISTRY/inctrl-beam:TAG \
#     deploy/run_flink.sh nightly --manifest s3://B/manifest.parquet --output s3://B/scores \
#       --date 2024-05-01
#   DRY_RUN=1 deploy/run_flink.sh nightly ...   # print the command, one argument per line
#
# Two ways to reach Flink (set one):
#   FLINK_MASTER   host:port of the JobManager's REST API: FlinkRunner packs the pipeline into
#                  a copy of Beam's Flink job server jar and uploads it (no Java needed on the
#                  launcher; the jar is fetched from Maven Central once and cached, or give a
#                  local copy as FLINK_JOB_SERVER_JAR).
#   JOB_ENDPOINT   host:port of a running Beam Flink job server, e.g.
#                    docker run --net=host apache/beam_flink1.19_job_server:2.77.0 \
#                      --flink-master=flink-jobmanager:8081
#                  then JOB_ENDPOINT=localhost:8099 (PortableRunner; no Java on the launcher).
# Workers (the SDK harness next to each TaskManager):
#   ENVIRONMENT_TYPE=DOCKER    (default) TaskManagers start WORKER_IMAGE (deploy/Dockerfile)
#   ENVIRONMENT_TYPE=EXTERNAL  a worker pool sidecar per TaskManager, started from the same
#                              image with --worker_pool; ENVIRONMENT_CONFIG=localhost:50000
#   ENVIRONMENT_TYPE=PROCESS   ENVIRONMENT_CONFIG='{"command": "/opt/apache/beam/boot"}' on
#                              TaskManagers that have this package installed
# Optional: FLINK_VERSION (default 1.19, must match the cluster), PARALLELISM (default 4),
#   DEVICE (cpu or cuda; default cpu), LAUNCH_PYTHON (default the repository's .venv).
# Manifest, images and output must be on storage every TaskManager can read (S3, GCS, HDFS,
# a shared mount), with the matching fsspec filesystem installed in the image.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
COMMAND="${1:?usage: deploy/run_flink.sh nightly|score --manifest URL --output URL [flags]}"
shift
case "$COMMAND" in nightly|score) ;; *) echo "unknown command $COMMAND (nightly or score)" >&2; exit 2;; esac
PYTHON="${LAUNCH_PYTHON:-$REPO/.venv/bin/python}"
ENVIRONMENT_TYPE="${ENVIRONMENT_TYPE:-DOCKER}"
if [ "$ENVIRONMENT_TYPE" = "DOCKER" ]; then
  : "${WORKER_IMAGE:?set WORKER_IMAGE (deploy/build_image.sh) for ENVIRONMENT_TYPE=DOCKER}"
  ENVIRONMENT_CONFIG="${ENVIRONMENT_CONFIG:-$WORKER_IMAGE}"
fi
: "${ENVIRONMENT_CONFIG:?set ENVIRONMENT_CONFIG for ENVIRONMENT_TYPE=$ENVIRONMENT_TYPE}"

if [ -n "${JOB_ENDPOINT:-}" ]; then
  ARGS=(--runner=PortableRunner "--job_endpoint=$JOB_ENDPOINT")
elif [ -n "${FLINK_MASTER:-}" ]; then
  ARGS=(--runner=FlinkRunner "--flink_master=$FLINK_MASTER"
        "--flink_version=${FLINK_VERSION:-1.19}" --flink_submit_uber_jar)
  [ -n "${FLINK_JOB_SERVER_JAR:-}" ] && ARGS+=("--flink_job_server_jar=$FLINK_JOB_SERVER_JAR")
else
  echo "set FLINK_MASTER (host:port of the Flink REST API) or JOB_ENDPOINT (Beam job server)" >&2
  exit 2
fi
ARGS+=(
  "--parallelism=${PARALLELISM:-4}"
  "--environment_type=$ENVIRONMENT_TYPE"
  "--environment_config=$ENVIRONMENT_CONFIG"
  # The job's own code reaches the workers in the image; staging it keeps them in step.
  "--setup_file=$REPO/setup.py"
  --device "${DEVICE:-cpu}"
)

CMD=("$PYTHON" -m pipeline "$COMMAND" "${ARGS[@]}" "$@")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%s\n' "${CMD[@]}"
  exit 0
fi
cd "$REPO"
exec "${CMD[@]}"
