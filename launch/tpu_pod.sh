#!/usr/bin/env bash
# Usage: TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh configs/imagenet32.py gs://bucket/run
# Runs the same command on all workers; jax.distributed.initialize() discovers the pod topology.
set -euo pipefail
config=$1; workdir=$2; shift 2
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command \
  "cd dpdm_jax && DPDM_MULTIHOST=1 python -m dpdm_jax.main --config=$config --workdir=$workdir --mode=train $*"
