#!/usr/bin/env bash
# Serve an export with the official TensorFlow Serving container (needs Docker and the image).
#
#   launch/tfserving.sh E [REST_PORT]        # E = the --out of `python -m liverjax.export`
#
# It serves E/liver/<newest version>/ as model "liver" on REST port REST_PORT (default 8501), the
# same API as `python -m liverjax.serve`, so `liverjax.client` (status, metadata, predict) works
# unchanged against either; :classify_dicom is liverjax.serve's only. New versions written into
# E/liver are picked up while it runs. Settings, as environment variables:
#
#   TFSERVING_IMAGE   default tensorflow/serving:latest (GPU: tensorflow/serving:latest-gpu,
#                     with TFSERVING_DOCKER_ARGS="--gpus all"; the export is lowered for CPU and
#                     CUDA). The SavedModel runs its StableHLO in an XlaCallModule op: use an image
#                     at least as new as the tensorflow that exported it.
#   MODEL_NAME        default liver
#   GRPC_PORT         default 8500
#   ENABLE_BATCHING   1 (default) batches concurrent requests, like liverjax.serve
#   MAX_BATCH_SIZE    default 16;  BATCH_TIMEOUT_MICROS default 0
#   DRY_RUN           1: print the docker command instead of running it
set -euo pipefail

usage="usage: $0 EXPORT_DIR [REST_PORT]   (EXPORT_DIR holds liver/<version>/saved_model.pb)"
export_dir="${1:?$usage}"
rest_port="${2:-8501}"
image="${TFSERVING_IMAGE:-tensorflow/serving:latest}"
model_name="${MODEL_NAME:-liver}"
grpc_port="${GRPC_PORT:-8500}"
enable_batching="${ENABLE_BATCHING:-1}"
max_batch_size="${MAX_BATCH_SIZE:-16}"
batch_timeout_micros="${BATCH_TIMEOUT_MICROS:-0}"

model_dir="$(cd "$export_dir" 2>/dev/null && pwd)/$model_name" || {
  echo "$0: $export_dir is not a directory; $usage" >&2
  exit 2
}
versions=$(find "$model_dir" -mindepth 2 -maxdepth 2 -name saved_model.pb 2>/dev/null \
  | sed -E 's#.*/([0-9]+)/saved_model.pb$#\1#' | grep -E '^[0-9]+$' | sort -n || true)
if [[ -z "$versions" ]]; then
  echo "$0: no $model_dir/<version>/saved_model.pb: export first" \
    "(python -m liverjax.export --workdir W --out $export_dir)" >&2
  exit 2
fi
echo "serving $model_name from $model_dir (versions: $(echo $versions | tr ' ' ','))" >&2

args=(--rest_api_port=8501 --port=8500 --model_name="$model_name"
  --model_base_path="/models/$model_name")
docker_args=(--rm -p "$rest_port:8501" -p "$grpc_port:8500" -v "$model_dir:/models/$model_name:ro")
if [[ "$enable_batching" == 1 ]]; then
  config_dir="$(mktemp -d)"
  cat > "$config_dir/batching.config" <<EOF
max_batch_size { value: $max_batch_size }
batch_timeout_micros { value: $batch_timeout_micros }
num_batch_threads { value: $(nproc 2>/dev/null || echo 4) }
max_enqueued_batches { value: 1000 }
EOF
  docker_args+=(-v "$config_dir:/config:ro")
  args+=(--enable_batching=true --batching_parameters_file=/config/batching.config)
fi
# shellcheck disable=SC2206  # word splitting of extra docker arguments is intended
docker_args+=(${TFSERVING_DOCKER_ARGS:-})

command=(docker run "${docker_args[@]}" --entrypoint tensorflow_model_server "$image" "${args[@]}")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
if ! command -v docker > /dev/null; then
  echo "$0: docker not found; install Docker, or serve with python -m liverjax.serve" \
    "--model_base_path $model_dir" >&2
  exit 127
fi
if ! docker image inspect "$image" > /dev/null 2>&1; then
  echo "$0: image $image is not here; run: docker pull $image" >&2
  exit 1
fi
exec "${command[@]}"
