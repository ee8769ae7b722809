#!/usr/bin/env bash
# The accelerator speed figures in one go: liverjax's train and inference steps (the seed CNN,
# bfloat16 compute, float32 parameters) at SIZE x SIZE, global batch BATCH, against the reference
# script's PyTorch (eager, torch.compile) and naive JAX versions, in the same process tree and on
# the same devices; end to end from the ArrayRecord records through grain; model FLOP
# utilisation; a jax.profiler trace with the kernels that take the time; the train step's
# optimised HLO.
#
#   launch/gpu_benchmark.sh OUT_DIR [REF_CNN_PY] [extra liverjax.benchmark flags...]
#
# Writes to OUT_DIR: benchmark.json (every figure), benchmark.log, devices.txt (nvidia-smi),
# profile.tar.gz (the trace: TensorBoard's profile plugin or xprof read it) and
# xla_dump.tar.gz (the train step's HLO before and after XLA's optimisation, its buffer
# assignment).
# The synthetic records (configs/default.py's dataset) are built on first use in DATA_DIR
# (default: TFDS's, ~/tensorflow_datasets or $TFDS_DATA_DIR).
# Offline hosts: install the wheels of launch/offline_wheels.sh first.
#
# Settings, as environment variables:
#   SIZE (224), BATCH (256), STEPS (30 timed steps a measurement), WARMUP (10),
#   WORKERS (8 grain worker processes for the end-to-end run), DTYPE (bfloat16),
#   DATA_DIR (records), PYTHON (python3).
set -euo pipefail

usage="usage: $0 OUT_DIR [REF_CNN_PY] [extra liverjax.benchmark flags...]"
out="${1:?$usage}"
shift
ref=""
if [[ $# -gt 0 && "$1" != --* ]]; then
  ref="$1"
  shift
fi
python="${PYTHON:-python3}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute: the HLO is packed from inside the temporary folder
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

{ nvidia-smi || true; nvidia-smi -q -d CLOCK,POWER || true; } >"$out/devices.txt" 2>&1
"$python" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$out/benchmark.log"

args=(
  --config configs/default.py
  --config.image_size="${SIZE:-224}"
  --config.batch_size="${BATCH:-256}"
  --config.model.dtype="${DTYPE:-bfloat16}"
  --config.input.num_workers="${WORKERS:-8}"
  --steps "${STEPS:-30}"
  --warmup "${WARMUP:-10}"
  --matmul_peak
  --profile_dir "$work/profile"
  --json_out "$out/benchmark.json"
)
if [[ -n "${DATA_DIR:-}" ]]; then
  args+=(--config.dataset.data_dir="$DATA_DIR")
fi
if [[ -n "$ref" ]]; then
  args+=(--torch_ref "$ref" --ref_frameworks jax,torch)
fi

# Only the train step's module is dumped (jit_train_step), as text.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$work/xla --xla_dump_hlo_as_text"
XLA_FLAGS+=" --xla_dump_hlo_module_re=.*train_step.*"
export PYTHONUNBUFFERED=1
export JAX_ENABLE_COMPILATION_CACHE=false  # a cached executable is not compiled, nor dumped
status=0
"$python" -m liverjax.benchmark "${args[@]}" "$@" 2>&1 | tee -a "$out/benchmark.log" || status=$?

if [[ -d "$work/profile" ]]; then
  tar -C "$work" -czf "$out/profile.tar.gz" profile
fi
# The HLO text of the train step (XLA also writes LLVM IR, objects and every module's MLIR there).
if [[ -d "$work/xla" ]]; then
  (cd "$work" && find xla -maxdepth 1 -name '*jit_train_step*.txt' -print0 |
    tar --null -czf "$out/xla_dump.tar.gz" -T -)
fi
exit "$status"
