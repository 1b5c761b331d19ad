"""GroupNorm (+ SiLU) on XLA:CPU: three forms of the same layer, per shape and in the whole step.

  flax     flax.linen.GroupNorm (reductions over a (B, H, W, G, C/G) view), then jax.nn.silu
  xla      layers.GroupNorm(kernel=False): per-channel sums over H, W, then per group (SiLU fused)
  kernel   layers.GroupNorm(kernel=True): the CPU kernel of models/kernels/group_norm.cc

`--layers`: forward + backward (input and parameter gradients) of each form at the GroupNorm
shapes of the MNIST network (B x K = 32 rows), medians of interleaved rounds, ms.
`--step`: the DP (or non-private) step of benchmarks/per_example_grads.py with the network's
GroupNorms built in each form, compiled in one process and timed interleaved, one step each per
round (same parameters, same data; only the layer's form differs). Prints one JSON object.

    python benchmarks/group_norm.py --layers --step --network mnist --part jax_dp --batch 8 --k 4
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

FORMS = ("flax", "xla", "kernel")
MNIST_SHAPES = ((28, 32), (28, 64), (28, 96), (14, 64), (14, 128), (7, 64), (7, 128))  # (H = W, C)


def make_group_norm(form: str):
    """A drop-in for layers.group_norm building the layer in `form`."""
    import flax.linen as nn

    from dpdm_jax.models import layers

    def group_norm(channels, name=None, *, silu=False, conv_impl="xla"):
        groups = layers.num_groups(channels)
        if form == "flax":
            gn = nn.GroupNorm(num_groups=groups, epsilon=1e-6, name=name)
            return nn.Sequential([gn, nn.silu]) if silu else gn
        return layers.GroupNorm(num_groups=groups, epsilon=1e-6, silu=silu, kernel=form == "kernel", name=name)

    return group_norm


@contextlib.contextmanager
def built_with(form: str):
    """Modules traced inside build their GroupNorms in `form`."""
    from dpdm_jax.models import ddpmpp, layers

    saved = layers.group_norm
    layers.group_norm = ddpmpp.group_norm = make_group_norm(form)
    try:
        yield
    finally:
        layers.group_norm = ddpmpp.group_norm = saved


def _median_ms(fns: dict, rounds: int) -> dict:
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: round(1e3 * statistics.median(t), 3) for name, t in times.items()}


def layers_table(rows: int, rounds: int) -> list:
    import jax
    import jax.numpy as jnp

    out = []
    for hw, c in MNIST_SHAPES:
        x = 2.0 * jax.random.normal(jax.random.key(0), (rows, hw, hw, c)) + 0.5
        cot = jax.random.normal(jax.random.key(1), x.shape)
        fns = {}
        for form in FORMS:
            layer = make_group_norm(form)(c, silu=True)
            params = layer.init(jax.random.key(2), x)
            grad = jax.jit(jax.grad(lambda p, x, cot, layer=layer: jnp.sum(layer.apply(p, x) * cot), argnums=(0, 1)))
            jax.block_until_ready(grad(params, x, cot))
            fns[form] = lambda grad=grad, params=params, x=x, cot=cot: jax.block_until_ready(grad(params, x, cot))
        out.append({"shape": [rows, hw, hw, c], "fwd_bwd_ms": _median_ms(fns, rounds)})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def step_table(network: str, part: str, batch: int, k: int, rounds: int) -> dict:
    from per_example_grads import jax_setup

    runs = {}
    for form in FORMS:
        with built_with(form):
            run, _ = jax_setup({"network": network, "part": part, "batch": batch, "k": k})
            run()  # compiled while the form is in place
        run()
        runs[form] = run
    return {"network": network, "part": part, "rows": batch * k, "step_ms": _median_ms(runs, rounds)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", action="store_true", help="per-shape forward + backward")
    p.add_argument("--step", action="store_true", help="the whole step, interleaved")
    p.add_argument("--network", default="mnist", choices=("mnist", "quickstart", "small"))
    p.add_argument("--part", default="jax_dp", choices=("jax_dp", "jax_nonprivate"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--rounds", type=int, default=21)
    args = p.parse_args()
    from dpdm_jax.main import rerun_with_tcmalloc

    rerun_with_tcmalloc([sys.executable, *sys.argv])  # the training command's allocator, as per_example_grads.py's workers
    from dpdm_jax.models import onednn

    if not onednn.available():
        sys.exit(f"the CPU kernels are unavailable: {onednn.unavailable_reason()}")
    out = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "ld_preload": os.environ.get("LD_PRELOAD", "")}
    if args.layers:
        out["layers"] = layers_table(args.batch * args.k, args.rounds)
    if args.step:
        out["step"] = step_table(args.network, args.part, args.batch, args.k, args.rounds)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
