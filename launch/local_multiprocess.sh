#!/usr/bin/env bash
# Run N JAX processes on this machine as one multi-process job (what a pod does, on one box): for testing
# multi-host code paths on CPU, or for splitting a multi-GPU box into one process per GPU group.
#
#   launch/local_multiprocess.sh N CONFIG WORKDIR [train flags ...]
#   DEVICES_PER_PROCESS=2 launch/local_multiprocess.sh 2 configs/clip.py:tiny runs/clip_2proc --config.total_steps=20
#
# Process i gets --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i; on CPU each has
# DEVICES_PER_PROCESS devices (JAX_NUM_CPU_DEVICES, default 1); with GPUS_PER_PROCESS=k process i sees GPUs
# [i*k, (i+1)*k) through CUDA_VISIBLE_DEVICES. Logs: WORKDIR.proc<i>.log. Exits non-zero if any process fails
# (and stops the others). PYTHON picks the interpreter (default: python).
set -uo pipefail
if [[ $# -lt 3 ]]; then sed -n '2,12p' "$0"; exit 2; fi
N=$1 CONFIG=$2 WORKDIR=$3
shift 3
PORT=${PORT:-$((20000 + RANDOM % 20000))}
PY=${PYTHON:-python}
mkdir -p "$(dirname "$WORKDIR")"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; }
trap cleanup INT TERM
for ((i = 0; i < N; i++)); do
  env_vars=(JAX_NUM_CPU_DEVICES="${DEVICES_PER_PROCESS:-1}")
  if [[ -n "${GPUS_PER_PROCESS:-}" ]]; then
    gpus=$(seq -s, $((i * GPUS_PER_PROCESS)) $(((i + 1) * GPUS_PER_PROCESS - 1)))
    env_vars+=(CUDA_VISIBLE_DEVICES="$gpus")
  fi
  env "${env_vars[@]}" "$PY" -m dalle2_jax.train --config "$CONFIG" --workdir "$WORKDIR" \
    --coordinator_address "127.0.0.1:$PORT" --num_processes "$N" --process_id "$i" "$@" > "$WORKDIR.proc$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then status=1; cleanup; fi
done
tail -n 3 "$WORKDIR.proc0.log"
exit $status
