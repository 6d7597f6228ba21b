#!/usr/bin/env bash
# Run the same training command on every worker of a Cloud TPU pod slice (one JAX process per host);
# jax.distributed.initialize() discovers the pod by itself.
#
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a bash launch/tpu_pod.sh --config configs/gpt3_xl.py \
#       --config.workdir=gs://my-bucket/runs/gpt3_xl
#   DRY_RUN=1 TPU_NAME=... ZONE=... bash launch/tpu_pod.sh ...    # print what would run
#
# The repository must be installed on every worker (REPO_DIR, default ~/celo2-harness:
# `pip install -e .` there), and the workdir must be on storage all workers share (a GCS bucket).
# Rerunning the same command after a preemption resumes from the latest checkpoint.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REPO_DIR="${REPO_DIR:-~/celo2-harness}"

# TRAIN_MODULE=tools.compare runs one run of a comparison instead (launch/tpu_compare.sh sets it).
train_args=$(printf '%q ' python -m "${TRAIN_MODULE:-train}" "$@" --config.multiprocess=True --config.cpu_devices=0)
remote="cd ${REPO_DIR} && ${train_args}"
cmd=(gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="${remote}")

if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
