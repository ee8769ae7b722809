#!/usr/bin/env bash
# N training processes on this machine, CPU only, talking through gloo on 127.0.0.1: the same
# multi-controller run as on a cluster (one jax.distributed coordinator, one global mesh, one
# shared checkpoint directory), small enough to test anywhere.
#
#   WORKDIR=runs/mp launch/multiprocess_cpu.sh N [extra liverjax.main flags...]
#   WORKDIR=runs/mp CONFIG=configs/test.py launch/multiprocess_cpu.sh 2 --config.num_train_steps=8
#
# Process i runs `python -m liverjax.main --config $CONFIG --workdir $WORKDIR` with
# --config.distributed.{coordinator_address,num_processes,process_id} set explicitly, logs to
# $WORKDIR/process_i.log (overwritten at each launch), and the script waits for all of them: it
# exits 0 only if every process did; when one fails, it stops the others and prints its log's
# end. Processes preempted by SIGTERM save and exit 143; so does the script then, if none failed.
# SIGTERM, SIGHUP or Ctrl-C to the script is passed on to the processes as SIGTERM.
# Launching again with the same WORKDIR resumes from the latest checkpoint.
#
# Settings, as environment variables:
#   WORKDIR               required: checkpoints, config.json, TensorBoard events, process logs
#   CONFIG                default configs/default.py
#   PORT                  coordinator port on 127.0.0.1, default 12355
#   DEVICES_PER_PROCESS   CPU devices each process shows JAX, default 1
#   PYTHON                default python
set -euo pipefail

usage="usage: WORKDIR=DIR $0 NUM_PROCESSES [extra liverjax.main flags...]"
num_processes="${1:?$usage}"
shift
workdir="${WORKDIR:?$usage}"
config="${CONFIG:-configs/default.py}"
port="${PORT:-12355}"
devices="${DEVICES_PER_PROCESS:-1}"
python="${PYTHON:-python}"
if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: NUM_PROCESSES must be a positive integer, got '$num_processes'" >&2
  exit 2
fi
mkdir -p "$workdir"

# CPU only; the last --xla_force_host_platform_device_count wins over one already in XLA_FLAGS.
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"

declare -A process_of_pid=()
# SIGTERM, SIGHUP or Ctrl-C to the script is a preemption of every process (they save and exit
# 143; the background processes of a script ignore SIGINT, so they get SIGTERM for it too): the
# script never leaves them running behind it. The processes are signalled before anything is
# written: with the terminal or a `| tee` gone, a write fails (SIGPIPE is ignored for that).
trap '' PIPE
forward() {
  for pid in "${!process_of_pid[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  echo "$1: stopping the processes (they save a checkpoint first)" >&2 || true
}
trap 'forward SIGTERM' TERM
trap 'forward SIGHUP' HUP
trap 'forward SIGINT' INT
for ((i = 0; i < num_processes; i++)); do
  "$python" -m liverjax.main \
    --config "$config" \
    --workdir "$workdir" \
    --config.distributed.coordinator_address="127.0.0.1:${port}" \
    --config.distributed.num_processes="$num_processes" \
    --config.distributed.process_id="$i" \
    "$@" >"$workdir/process_${i}.log" 2>&1 &
  process_of_pid[$!]=$i
done
echo "started $num_processes processes (coordinator 127.0.0.1:${port}); logs: $workdir/process_*.log" || true

# Seconds a process gets to exit after SIGTERM, once another failed, before SIGKILL.
stop_grace=10
status=0
preempted=0
preempted_code=143  # liverjax.main after SIGTERM: checkpoint saved, run not finished
while ((${#process_of_pid[@]} > 0)); do
  sleep 1 || true  # a Ctrl-C ends the sleep too; the trap has run
  for pid in "${!process_of_pid[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    code=0
    wait "$pid" || code=$?
    i="${process_of_pid[$pid]}"
    unset "process_of_pid[$pid]"
    if ((code == preempted_code)); then
      preempted=1
      continue
    fi
    if ((code == 0 || status != 0)); then
      continue
    fi
    status=1
    echo "process $i failed (exit $code); the end of $workdir/process_${i}.log:" >&2 || true
    tail -n 30 "$workdir/process_${i}.log" >&2 || true
    # The others would wait for it in collectives until a timeout: stop them.
    for other in "${!process_of_pid[@]}"; do
      kill -TERM "$other" 2>/dev/null || true
    done
    for ((t = 0; t < stop_grace; t++)); do
      sleep 1 || true
      alive=0
      for other in "${!process_of_pid[@]}"; do
        if kill -0 "$other" 2>/dev/null; then alive=1; fi
      done
      if ((alive == 0)); then break; fi
    done
    for other in "${!process_of_pid[@]}"; do
      kill -KILL "$other" 2>/dev/null || true
    done
  done
done
if ((status == 0 && preempted == 1)); then
  # Before its first checkpoint a process stopped by SIGTERM exits 143 too, with nothing saved.
  if ls "$workdir/checkpoints" 2>/dev/null | grep -qE '^[0-9]+$'; then
    echo "preempted: the checkpoint is saved; launch again with WORKDIR=$workdir to resume" || true
  else
    echo "stopped before the first checkpoint: launching again starts the run" || true
  fi
  exit "$preempted_code"
fi
if ((status == 0)); then
  echo "all $num_processes processes finished" || true
fi
exit "$status"
