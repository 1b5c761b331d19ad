#!/usr/bin/env bash
# Run on every host. Needs COORDINATOR (host:port of process 0), NUM_PROCESSES, PROCESS_ID.
# Under SLURM: COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):12345
#              NUM_PROCESSES=$SLURM_NTASKS PROCESS_ID=$SLURM_PROCID
# Usage: launch/multihost.sh configs/cifar10.py runs/cifar10 [--config.x=y ...]
set -euo pipefail
config=$1; workdir=$2; shift 2
: "${COORDINATOR:?set COORDINATOR=host:port}" "${NUM_PROCESSES:?}" "${PROCESS_ID:?}"
exec python -m dpdm_jax.main --config="$config" --workdir="$workdir" --mode=train \
  --coordinator_address="$COORDINATOR" --num_processes="$NUM_PROCESSES" --process_id="$PROCESS_ID" "$@"
