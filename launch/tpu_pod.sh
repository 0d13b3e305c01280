#!/usr/bin/env bash
# Train a stage on a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [train flags ...]
#   launch/tpu_pod.sh dalle2-decoder us-east5-a v5p-128 configs/decoder.py:paper gs://BUCKET/runs/decoder \
#       --config.clip_workdir=gs://BUCKET/runs/clip --config.data.name=my_pairs --config.data.data_dir=gs://BUCKET/tfds
#
# 1. creates the TPU VMs if NAME does not exist (TPU_VERSION picks the software image),
# 2. copies this checkout (git archive of HEAD) to every worker and installs it with jax[tpu] in ~/dalle2-venv,
# 3. starts the same train command on every worker (--worker=all) in the background: JAX finds the other hosts
#    through the TPU metadata (--distributed), each host reads its part of every global batch, orbax writes the
#    checkpoints from all hosts to WORKDIR, which every worker must reach (a gs:// path, with the TPU VMs'
#    service account, or a shared mount such as Filestore), process 0 logs,
# 4. points JAX's persistent compilation cache at JAX_CACHE (default: next to WORKDIR), so a restart or a
#    preempted slice skips the compile.
# Logs: gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0 --command 'tail -f ~/dalle2-train.log'
# Stop: launch/tpu_pod.sh stop NAME ZONE      Delete: gcloud compute tpus tpu-vm delete NAME --zone ZONE
set -euo pipefail

if [[ "${1:-}" == "stop" ]]; then
  gcloud compute tpus tpu-vm ssh "$2" --zone "$3" --worker=all --command "pkill -f dalle2_jax.train || true"
  exit 0
fi
if [[ $# -lt 5 ]]; then
  sed -n '2,20p' "$0"; exit 2
fi
NAME=$1 ZONE=$2 ACCEL=$3 CONFIG=$4 WORKDIR=$5
shift 5
case "$ACCEL" in
  v5p-*) DEFAULT_VERSION=v2-alpha-tpuv5 ;;
  v5litepod-*|v5e-*) DEFAULT_VERSION=v2-alpha-tpuv5-lite ;;
  v6e-*) DEFAULT_VERSION=v2-alpha-tpuv6e ;;
  *) DEFAULT_VERSION=tpu-ubuntu2204-base ;;
esac
TPU_VERSION=${TPU_VERSION:-$DEFAULT_VERSION}
JAX_CACHE=${JAX_CACHE:-$(dirname "$WORKDIR")/jax_cache}
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" --version "$TPU_VERSION"
fi

ARCHIVE=$(mktemp -t dalle2-jax-XXXX.tar.gz)
git -C "$REPO_ROOT" archive --format=tar.gz -o "$ARCHIVE" HEAD
gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME":~/dalle2-jax.tar.gz --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "set -e
  rm -rf ~/dalle2-jax && mkdir -p ~/dalle2-jax && tar -xzf ~/dalle2-jax.tar.gz -C ~/dalle2-jax
  python3 -m venv ~/dalle2-venv
  ~/dalle2-venv/bin/pip install -q -U pip
  ~/dalle2-venv/bin/pip install -q 'jax[tpu]==0.10.2' -e ~/dalle2-jax[gcs]"

# One process per host; --distributed: jax.distributed.initialize() reads the slice from the TPU metadata.
printf -v EXTRA '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "cd ~/dalle2-jax &&
  JAX_COMPILATION_CACHE_DIR=$JAX_CACHE JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1 \
  nohup ~/dalle2-venv/bin/python -m dalle2_jax.train --config $CONFIG --workdir $WORKDIR --distributed $EXTRA \
  > ~/dalle2-train.log 2>&1 &"
echo "started on every worker of $NAME; logs: gcloud compute tpus tpu-vm ssh $NAME --zone $ZONE --worker=0 --command 'tail -f ~/dalle2-train.log'"
