#!/usr/bin/env bash
# Try the multi-host path on one machine: N processes x D fake CPU devices each.
# Usage: launch/local_multiprocess.sh 2 2 configs/test_tiny.py /tmp/mp_run [--config.x=y ...]
set -euo pipefail
n=$1; d=$2; config=$3; workdir=$4; shift 4
port=$((20000 + RANDOM % 20000))
pids=()
for i in $(seq 0 $((n - 1))); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$d" JAX_PLATFORMS=cpu \
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
    python -m dpdm_jax.main --config="$config" --workdir="$workdir" --mode=train \
    --coordinator_address="localhost:$port" --num_processes="$n" --process_id="$i" "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
