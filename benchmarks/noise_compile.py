"""Compile time of the DP noise: one normal draw per parameter leaf vs one draw cut into the leaves.

`dp.gaussian_noise_like` draws all d normals at once and cuts them into the leaves; the per-leaf
form (one `jax.random.normal` per leaf, kept here as the reference) gives the same distribution
but XLA:CPU compiles one random-number generator per leaf. Both are compiled alternately
(`--rounds` times) for a network's parameter tree; prints one JSON object.

    python benchmarks/noise_compile.py --config=quickstart --rounds 2
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpdm_jax import experiment  # noqa: E402
from dpdm_jax.dp import gaussian_noise_like  # noqa: E402
from dpdm_jax.models import init_variables  # noqa: E402


def per_leaf_noise(tree, key, stddev):
    """The reference: one independent draw per leaf (the library's form before 2026-12-02)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [stddev * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="quickstart", help="a module of configs/ (its network)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    config = importlib.import_module(f"configs.{args.config}").get_config()
    params = init_variables(experiment.build_model(config), jax.random.key(0))["params"]
    forms = {"per_leaf": per_leaf_noise, "one_draw": gaussian_noise_like}
    compile_s = {name: [] for name in forms}
    for _ in range(args.rounds):
        for name, fn in forms.items():
            start = time.perf_counter()
            jax.jit(lambda p, k, fn=fn: fn(p, k, 0.5)).lower(params, jax.random.key(1)).compile()
            compile_s[name].append(round(time.perf_counter() - start, 2))
    medians = {name: statistics.median(t) for name, t in compile_s.items()}
    print(json.dumps({"config": args.config, "leaves": len(jax.tree.leaves(params)),
                      "params": sum(x.size for x in jax.tree.leaves(params)), "compile_s": compile_s,
                      "median_compile_s": medians,
                      "per_leaf_over_one_draw": round(medians["per_leaf"] / medians["one_draw"], 2),
                      "load_avg": os.getloadavg(), "backend": jax.default_backend()}))


if __name__ == "__main__":
    main()
