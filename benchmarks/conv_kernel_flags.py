"""One 3x3 convolution under different XLA_FLAGS: which kernel XLA:CPU uses, and how fast it is.

    python benchmarks/conv_kernel_flags.py --rounds 2 \
        --variants "" "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

Each variant runs in its own process (XLA reads XLA_FLAGS once), alternately for --rounds rounds,
and reports: whether the compiled gradient program holds YNNPACK fusions, the median time of the
forward pass and of forward + both gradients (ms, of 15 calls), and a checksum of the outputs (a
different kernel may round differently). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def measure(batch: int, size: int, channels: int) -> dict:
    """Runs in the child process: time one conv (NHWC, 3x3, SAME) and its gradients."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    w = jax.random.normal(jax.random.key(1), (3, 3, channels, channels)) * 0.05

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fwd = jax.jit(conv)
    both = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
    hlo = both.lower(x, w).compile().as_text()
    out = {"ynn_fusions": hlo.count("__ynn_fusion"), "xnn_fusions": hlo.count("__xnn_fusion"),
           "checksum_fwd": float(jnp.sum(fwd(x, w))), "checksum_wgrad": float(jnp.sum(both(x, w)[1]))}
    for name, f in (("fwd_ms", lambda: fwd(x, w)), ("fwd_bwd_ms", lambda: both(x, w))):
        jax.block_until_ready(f())
        times = []
        for _ in range(15):
            t = time.perf_counter()
            jax.block_until_ready(f())
            times.append(time.perf_counter() - t)
        out[name] = round(sorted(times)[len(times) // 2] * 1e3, 3)
    out["gflop_fwd"] = 2 * batch * size * size * channels * channels * 9 / 1e9
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["", "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"],
                   help="XLA_FLAGS values, one process each ('' = the default)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.batch, args.size, args.channels)))
        return
    results = []
    for r in range(args.rounds):
        for flags in args.variants:
            env = dict(os.environ, XLA_FLAGS=flags)
            cmd = [sys.executable, __file__, "--child", f"--batch={args.batch}", f"--size={args.size}",
                   f"--channels={args.channels}"]
            line = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.append({"round": r, "xla_flags": flags, **json.loads(line)})
    print(json.dumps({"shape": [args.batch, args.size, args.size, args.channels], "kernel": "3x3",
                      "load_average": os.getloadavg(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
