#!/usr/bin/env bash
# Train on one host with all its accelerators: one process, JAX sees every local GPU (or TPU
# chip) and the mesh spans them all; the global batch is split over them.
#
#   launch/local.sh WORKDIR [extra liverjax.main flags...]
#   CONFIG=configs/default.py launch/local.sh runs/exp1 --config.dataset.data_dir=DATA
#
# Launching again with the same WORKDIR resumes from its latest checkpoint. Settings, as
# environment variables:
#   CONFIG                default configs/default.py
#   CUDA_VISIBLE_DEVICES  restrict to some GPUs (e.g. 0,1); unset = all
#   PYTHON                default python
set -euo pipefail

usage="usage: $0 WORKDIR [extra liverjax.main flags...]"
workdir="${1:?$usage}"
shift
config="${CONFIG:-configs/default.py}"
python="${PYTHON:-python}"

# One process: config.distributed.enabled='auto' finds no cluster here and starts none (inside a
# multi-task SLURM allocation, use slurm.sbatch instead).
exec "$python" -m liverjax.main --config "$config" --workdir "$workdir" "$@"
