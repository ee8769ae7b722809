#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: the same command on every host of the slice (one process per
# host, each driving its local chips). jax.distributed.initialize() finds the other hosts through
# the TPU metadata, so no coordinator is passed by hand.
#
#   TPU=my-v5e-32 ZONE=us-central2-b launch/tpu_vm.sh WORKDIR [extra liverjax.main flags...]
#   TPU=my-v4-16 ZONE=us-central2-b REPO_DIR='~/liverjax' launch/tpu_vm.sh gs://bucket/runs/exp1 \
#       --config.dataset.data_dir=gs://bucket/liver_data
#
# Every host needs the repository (at REPO_DIR) and its environment (`pip install -e .` plus
# jax[tpu]); WORKDIR and data_dir must be shared by all hosts: a gs:// path. Running again with
# the same WORKDIR resumes. Settings, as environment variables:
#   TPU        required: the TPU VM name
#   ZONE       required: its zone
#   PROJECT    default: gcloud's configured project
#   REPO_DIR   the repository on the hosts, default ~/liverjax
#   CONFIG     default configs/default.py
#   PYTHON     the hosts' python, default python3
#   DRY_RUN    1: print the gcloud command instead of running it
set -euo pipefail

usage="usage: TPU=NAME ZONE=ZONE $0 WORKDIR [extra liverjax.main flags...]"
workdir="${1:?$usage}"
shift
tpu="${TPU:?$usage}"
zone="${ZONE:?$usage}"
repo_dir="${REPO_DIR:-~/liverjax}"
config="${CONFIG:-configs/default.py}"
python="${PYTHON:-python3}"

# Quote every argument for the remote shell (they travel as one string); a leading ~/ of the
# repository stays unquoted, so that the remote shell expands it to the remote home.
if [[ "$repo_dir" == "~/"* ]]; then
  remote_dir="~/$(printf '%q' "${repo_dir#\~/}")"
else
  remote_dir="$(printf '%q' "$repo_dir")"
fi
remote="cd ${remote_dir} && $(printf '%q' "$python") -m liverjax.main"
for arg in --config "$config" --workdir "$workdir" "$@"; do
  remote+=" $(printf '%q' "$arg")"
done

cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote")
if [[ -n "${PROJECT:-}" ]]; then
  cmd+=(--project "$PROJECT")
fi
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
