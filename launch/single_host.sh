#!/usr/bin/env bash
# Usage: launch/single_host.sh configs/mnist.py:eps1 runs/mnist_eps1 [--config.x=y ...]
set -euo pipefail
config=$1; workdir=$2; shift 2
exec python -m dpdm_jax.main --config="$config" --workdir="$workdir" --mode=train "$@"
