"""Peak memory of one DP-SGD step: bounded by the chunk size, not by the logical batch size.

For each chunk size (examples per accumulate call) a fresh worker subprocess builds the MNIST
DDPM++ DP step (dpdm_jax.dp.DPSGDStep, K noise draws per example), compiles it with a
one-chunk step, then runs one logical step for each logical batch size L (ceil(L / chunk)
chunks, the last one padded with masked rows). Before every measured step the process's
peak-RSS counter is reset (Linux: "5" > /proc/self/clear_refs), so each figure is the peak
resident memory of that step alone (parameters, optimiser state and the resident program
included); compile-time peaks are reported separately.

    python benchmarks/dp_memory.py --chunks 1 2 4 --batches 4 16 64 --k 32

The paper's logical batch (4000 examples x K=32) with chunk 4:

    python benchmarks/dp_memory.py --chunks 4 --batches 4000 --k 32

Prints one JSON object to stdout (progress on stderr).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

from proc_memory import reset_peak, status_kib

HERE = os.path.dirname(os.path.abspath(__file__))
NETWORKS = {"mnist": {}, "quickstart": dict(nf=16, num_res_blocks=1, attn_resolutions=())}


def worker(cfg):
    if cfg.get("threads"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: cfg["threads"]])
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from dpdm_jax.diffusion import get_parameterisation, make_per_example_loss
    from dpdm_jax.dp import DPSGDStep, data_mesh
    from dpdm_jax.models import ddpmpp_for, init_shapes

    chunk, k = cfg["chunk"], cfg["k"]
    # The paper's MNIST network, or the quickstart's (configs/quickstart.py).
    model = ddpmpp_for("mnist", **NETWORKS[cfg.get("network", "mnist")])
    shapes = init_shapes(model)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32)), shapes)
    loss_fn = make_per_example_loss(lambda p, x, c, y: model.apply({"params": p}, x, c, y),
                                    get_parameterisation("edm"), k, 10, 0.1)
    n_data = max(cfg["batches"])
    images = rng.uniform(-1, 1, (n_data, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, n_data).astype(np.int32)
    step_fn = DPSGDStep(loss_fn, optax.adam(3e-4), clip_norm=1.0, noise_multiplier=2.488,
                        expected_batch_size=float(n_data), mesh=data_mesh(jax.devices()[:1]),
                        microbatch_size=cfg.get("microbatch"))

    def chunks(batch):
        for c in range(math.ceil(batch / chunk)):
            idx = np.arange(c * chunk, (c + 1) * chunk)
            mask = idx < batch
            idx = np.where(mask, idx, 0).astype(np.int32)
            yield {"image": images[idx], "label": labels[idx]}, idx, mask

    state = step_fn.init(params)
    t0 = time.perf_counter()
    state, _ = step_fn(state, chunks(chunk), jax.random.key(0), 0)  # compiles accumulate + update
    jax.block_until_ready(state.params)
    out = {"chunk": chunk, "k": k, "rows_per_chunk": chunk * k, "compile_and_first_step_s": round(time.perf_counter() - t0, 1),
           "peak_rss_incl_compile_mb": round(status_kib("VmHWM") / 1024), "steps": []}
    step = 1
    for batch in cfg["batches"]:
        jax.block_until_ready(state.params)
        reset = reset_peak()
        rss_before = status_kib("VmRSS")
        t = time.perf_counter()
        n_chunks = math.ceil(batch / chunk)
        state, stats = step_fn(state, _progress(chunks(batch), n_chunks, batch), jax.random.key(0), step)
        jax.block_until_ready(state.params)
        wall = time.perf_counter() - t
        step += 1
        out["steps"].append({
            "logical_batch": batch, "chunks": n_chunks, "rows": batch * k, "step_s": round(wall, 2),
            "s_per_chunk": round(wall / n_chunks, 3), "rows_per_s": round(batch * k / wall, 2),
            "rss_before_mb": round(rss_before / 1024), "peak_rss_mb": round(status_kib("VmHWM") / 1024),
            "peak_reset": reset, "examples_seen": float(stats.num_examples)})
        print(json.dumps(out["steps"][-1]), file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(out), flush=True)


def _progress(it, n_chunks, batch):
    t0 = time.perf_counter()
    for i, item in enumerate(it):
        if i and (i % 50 == 0):
            el = time.perf_counter() - t0
            print(f"  batch {batch}: chunk {i}/{n_chunks}, {el:.0f}s, eta {el / i * (n_chunks - i):.0f}s",
                  file=sys.stderr, flush=True)
        yield item


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4], help="examples per chunk")
    p.add_argument("--batches", type=int, nargs="+", default=[4, 16, 64], help="logical batch sizes (examples)")
    p.add_argument("--k", type=int, default=32, help="noise draws per example")
    p.add_argument("--microbatch", type=int, default=None, help="DPSGDStep microbatch_size")
    p.add_argument("--network", choices=sorted(NETWORKS), default="mnist", help="DDPM++ network")
    p.add_argument("--threads", type=int, default=None, help="CPUs per worker (affinity mask)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per worker")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    out = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "load_avg_at_start": os.getloadavg(), "network": args.network, "microbatch": args.microbatch,
           "results": []}
    for chunk in args.chunks:
        cfg = dict(chunk=chunk, k=args.k, batches=sorted(args.batches), microbatch=args.microbatch, threads=args.threads,
                   network=args.network)
        try:
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                               stdout=subprocess.PIPE, text=True, env=env, timeout=args.timeout)
            lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
            out["results"].append(json.loads(lines[-1][7:]) if lines else {"chunk": chunk, "error": f"rc={r.returncode}"})
        except subprocess.TimeoutExpired:
            out["results"].append({"chunk": chunk, "error": f"timeout {args.timeout}s"})
    out["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
