#!/usr/bin/env bash
# Submit the job to Google Cloud Dataflow with GPU workers running deploy/Dockerfile's image.
#
#   deploy/run_dataflow.sh nightly --manifest gs://B/manifest.parquet --output gs://B/scores \
#       --date 2024-05-01 [--k 4 --seeds 0,1,2 ...]
#   deploy/run_dataflow.sh score --manifest gs://B/manifest.parquet --output gs://B/scores
#   DRY_RUN=1 deploy/run_dataflow.sh nightly ...   # print the command, one argument per line
#
# Required environment:
#   GCP_PROJECT      project id
#   GCP_REGION       Dataflow region with the GPU type, e.g. us-central1
#   GCS_TEMP         gs:// folder for temp and staging files
#   WORKER_IMAGE     worker image built by deploy/build_image.sh (same Beam and Python versions)
# Optional:
#   GPU_TYPE=nvidia-l4  GPU_COUNT=1  MACHINE_TYPE=g2-standard-8 (G2 carries L4 GPUs; use an
#       N1 type such as n1-standard-8 for nvidia-tesla-t4, a2-highgpu-1g for nvidia-tesla-a100)
#   GPU_TYPE=none       CPU workers (MACHINE_TYPE=n2-standard-8, --device cpu)
#   MODEL_SHARING=shared   (default) one SDK process per vCPU; the image model (RunInference)
#       is served once per VM to all of them (--share-model-across-processes); the other
#       stages hold no model on the GPU (config-only geometry, text tower on the CPU).
#   MODEL_SHARING=process  one SDK process per worker VM (Dataflow's
#       no_use_multiple_sdk_containers), which also holds one copy per GPU.
#   MAX_WORKERS=4  DISK_GB=60  JOB_NAME=inctrl-<command>-<time>  PRECISION (bf16 on L4/A100,
#   fp32 on T4)  SERVICE_ACCOUNT  SUBNETWORK (with NO_PUBLIC_IPS=1)  LAUNCH_PYTHON (default
#   the repository's .venv; needs apache-beam[gcp] and gcsfs to submit and read gs:// paths)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
COMMAND="${1:?usage: deploy/run_dataflow.sh nightly|score --manifest gs://... --output gs://... [flags]}"
shift
case "$COMMAND" in nightly|score) ;; *) echo "unknown command $COMMAND (nightly or score)" >&2; exit 2;; esac
: "${GCP_PROJECT:?set GCP_PROJECT}"
: "${GCP_REGION:?set GCP_REGION}"
: "${GCS_TEMP:?set GCS_TEMP to a gs:// folder}"
: "${WORKER_IMAGE:?set WORKER_IMAGE (deploy/build_image.sh)}"
GPU_TYPE="${GPU_TYPE:-nvidia-l4}"
GPU_COUNT="${GPU_COUNT:-1}"
MODEL_SHARING="${MODEL_SHARING:-shared}"
PYTHON="${LAUNCH_PYTHON:-$REPO/.venv/bin/python}"
JOB_NAME="${JOB_NAME:-inctrl-$COMMAND-$(date -u +%Y%m%d-%H%M%S)}"

ARGS=(
  --runner=DataflowRunner
  "--project=$GCP_PROJECT"
  "--region=$GCP_REGION"
  "--temp_location=${GCS_TEMP%/}/temp"
  "--staging_location=${GCS_TEMP%/}/staging"
  "--job_name=$JOB_NAME"
  # Workers run the custom container with torch, CUDA and this package; its Beam SDK is used.
  "--sdk_container_image=$WORKER_IMAGE"
  --sdk_location=container
  # ...and the submitted code is staged too, so workers run exactly this checkout.
  "--setup_file=$REPO/setup.py"
  --experiments=use_runner_v2
  "--max_num_workers=${MAX_WORKERS:-4}"
  --autoscaling_algorithm=THROUGHPUT_BASED
  "--disk_size_gb=${DISK_GB:-60}"
)
if [ "$GPU_TYPE" = "none" ]; then
  ARGS+=("--machine_type=${MACHINE_TYPE:-n2-standard-8}" --device cpu)
else
  ARGS+=(
    "--machine_type=${MACHINE_TYPE:-g2-standard-8}"
    "--dataflow_service_options=worker_accelerator=type:$GPU_TYPE;count:$GPU_COUNT;install-nvidia-driver"
    --device cuda
  )
  case "$MODEL_SHARING" in
    process) ARGS+=(--experiments=no_use_multiple_sdk_containers) ;;
    shared) ARGS+=(--share-model-across-processes) ;;
    *) echo "MODEL_SHARING must be process or shared, got $MODEL_SHARING" >&2; exit 2 ;;
  esac
fi
[ -n "${PRECISION:-}" ] && ARGS+=(--precision "$PRECISION")
[ -n "${SERVICE_ACCOUNT:-}" ] && ARGS+=("--service_account_email=$SERVICE_ACCOUNT")
[ -n "${SUBNETWORK:-}" ] && ARGS+=("--subnetwork=$SUBNETWORK")
[ "${NO_PUBLIC_IPS:-0}" = "1" ] && ARGS+=(--no_use_public_ips)

CMD=("$PYTHON" -m pipeline "$COMMAND" "${ARGS[@]}" "$@")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%s\n' "${CMD[@]}"
  exit 0
fi
cd "$REPO"
exec "${CMD[@]}"
