#!/usr/bin/env bash
# Per-example-gradient benchmark on a GPU machine, plus the projected time of one epoch (and of
# the whole run) of the paper's MNIST recipe: N = 60000, expected batch 4000 (q = 1/15),
# K = 32 noise draws, 4500 steps = 300 epochs, i.e. 60000 * 32 = 1.92M network rows per epoch.
#
# Needs a CUDA build of jax (same version as setup.py, e.g. pip install "jax[cuda12]==0.10.2")
# and, for the Opacus columns, a CUDA build of torch 2.13.0 plus opacus 1.6.0 (the benchmark's
# torch workers use the GPU when torch.cuda.is_available()). Without torch the JAX parts run alone.
#
#   bash benchmarks/gpu_run.sh                  # default sweep of chunk sizes
#   BATCHES="64 128" K=32 bash benchmarks/gpu_run.sh
#
# Writes benchmarks/results/gpu_<date>.json (one JSON per chunk size, one per line) and prints a
# summary table. On GPU, models/layers.py picks the plain XLA convolution ("auto").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BATCHES=${BATCHES:-"16 64 128"}
K=${K:-32}
REPEATS=${REPEATS:-5}
TIMEOUT=${TIMEOUT:-1800}
OUT=${OUT:-benchmarks/results/gpu_$(date +%Y%m%d_%H%M%S).json}
mkdir -p "$(dirname "$OUT")"

backend=$($PY -c "import jax; print(jax.default_backend())")
echo "jax backend: $backend ($($PY -c 'import jax; print(jax.devices()[0].device_kind)'))" >&2
if [ "$backend" != "gpu" ]; then
  echo "warning: jax does not see a GPU; results will be CPU numbers" >&2
fi
PARTS="jax_nonprivate jax_dp"
if $PY -c "import torch, opacus, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PARTS="$PARTS torch_nonprivate opacus_dp"
else
  echo "torch with CUDA / opacus not found: JAX parts only" >&2
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >&2 || true

: > "$OUT"
for B in $BATCHES; do
  echo "== B=$B examples x K=$K draws ($((B * K)) rows per step)" >&2
  # Keep XLA from grabbing all GPU memory up front in each of the worker processes.
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout $((TIMEOUT + 60)) \
    $PY benchmarks/per_example_grads.py --networks mnist --parts $PARTS port_check \
      --batch "$B" --k "$K" --repeats "$REPEATS" --timeout "$TIMEOUT" | $PY -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' >> "$OUT"
done

$PY - "$OUT" <<'EOF'
import json, sys
rows_per_epoch = 60000 * 32          # N examples x K draws
epochs = 4500 / 15                   # 4500 steps at q = 1/15
print(f"results: {sys.argv[1]}")
print("| B x K | part | rows/s | s per step of 4000 x 32 | one epoch (h) | 300 epochs (days) | peak host RSS (MB) |")
print("|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    d = json.loads(line)
    for part, r in d["networks"]["mnist"].items():
        rate = r.get("rows_per_s") if isinstance(r, dict) else None
        if not rate:
            continue
        epoch_h = rows_per_epoch / rate / 3600
        print(f"| {d['batch']} x {d['k']} | {part} | {rate:.0f} | {4000 * 32 / rate:.1f} | {epoch_h:.2f} "
              f"| {epoch_h * epochs / 24:.1f} | {r.get('peak_rss_mb')} |")
    print("ratios:", json.dumps(d["networks"]["mnist"].get("ratios", {})))
EOF
