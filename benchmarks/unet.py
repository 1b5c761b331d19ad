"""Forward+backward throughput of the paper's MNIST DDPM++ (1,753,345 parameters).

Times a jitted step computing the gradient of a mean-squared output w.r.t. all parameters
(one forward and one backward pass; no optimiser), at several batch sizes. Reports the
compile time (first call, including the first run), the median of `--repeats` timed runs
after one untimed warm-up run, and rows/s = batch / median. With --per-example the step
is vmap(grad) over single examples instead, as in DP-SGD (not yet clipped).

Prints one JSON object to stdout. Example:
    python benchmarks/unet.py --batch-sizes 16 64 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpdm_jax.models import count_params, ddpmpp_for, init_shapes


def make_step(model, per_example: bool):
    def loss(params, x, noise, labels):
        return jnp.mean(model.apply(params, x, noise, labels) ** 2)

    if not per_example:
        return jax.jit(jax.grad(loss))

    def one(params, x, noise, labels):  # a batch of one, so the network sees (1, H, W, C)
        return jax.grad(loss)(params, x[None], noise[None], labels[None])

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per batch size")
    parser.add_argument("--per-example", action="store_true", help="vmap(grad) per example")
    parser.add_argument("--real-init", action="store_true",
                        help="also time model.init (threefry; slow to compile on CPU)")
    args = parser.parse_args()

    model = ddpmpp_for(args.dataset)
    shapes = init_shapes(model)
    result = {
        "network": f"DDPMpp {args.dataset}",
        "params": count_params(shapes),
        "mode": "per-example vmap(grad)" if args.per_example else "batch grad",
        "backend": jax.default_backend(),
        "devices": str(jax.devices()[0]),
        "machine": platform.processor() or platform.machine(),
        "repeats": args.repeats,
    }
    if args.real_init:
        size = model.image_size
        t0 = time.perf_counter()
        params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, model.in_channels)),
                                     jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
        jax.block_until_ready(params)
        result["init_s"] = round(time.perf_counter() - t0, 3)
    else:  # Values do not affect speed; numpy avoids compiling the PRNG.
        rng = np.random.default_rng(0)
        params = jax.tree_util.tree_map(
            lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32)), shapes)

    step = make_step(model, args.per_example)
    rows = []
    for b in args.batch_sizes:
        rng = np.random.default_rng(b)
        size, c = model.image_size, model.in_channels
        x = jnp.asarray(rng.standard_normal((b, size, size, c), np.float32))
        noise = jnp.asarray(rng.standard_normal((b,), np.float32))
        n_cls = model.num_classes or 0
        labels = jnp.asarray(rng.integers(0, n_cls + 1, (b,)), jnp.int32)

        t0 = time.perf_counter()
        jax.block_until_ready(step(params, x, noise, labels))
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(step(params, x, noise, labels))  # warm-up, untimed
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(step(params, x, noise, labels))
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append({"batch": b, "compile_s": round(compile_s, 3), "median_s": round(med, 4),
                     "rows_per_s": round(b / med, 2), "times_s": [round(t, 4) for t in times]})
    result["results"] = rows
    print(json.dumps(result))


if __name__ == "__main__":
    main()
