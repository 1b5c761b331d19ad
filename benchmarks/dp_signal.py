"""Signal-to-noise of one DP-SGD step: how strong is the mean clipped gradient against the noise?

For a per-example clipped gradient c_i (norm <= C) the step direction is

    g = (sum_{i in batch} c_i + N(0, sigma^2 C^2 I_d)) / (qN),

whose expectation is mu = E[c_i] (times the realised/expected batch ratio, ~1). This script
estimates ||mu|| without bias from two disjoint halves A, B of M examples drawn from the
training set, ||mu||^2 ~= <mean_A c, mean_B c> (the cross term has no sampling-noise bias), and
reports it against the DP noise on the mean, sigma C sqrt(d) / (qN), and against the sampling
noise of a batch, sqrt(E||c||^2 - ||mu||^2) / sqrt(qN). Their ratio per step, and the number
T * SNR^2 that a run of T steps accumulates, compare (batch size, steps, K) settings at a fixed
epsilon without training each one.

    python benchmarks/dp_signal.py --workdir runs/quickstart --ks 1 4 --examples 512
    python benchmarks/dp_signal.py --workdir runs/nf8 --set model.nf=8 --ks 1   # a run with overrides

Uses the checkpoint's parameters (not EMA) at the latest step, or the initial parameters with
--init. The numbers are statistics of private data (outside any guarantee); they inform settings.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import quickstart  # noqa: E402
from dpdm_jax import checkpoint, experiment  # noqa: E402
from dpdm_jax.dp import accounting, clipping  # noqa: E402


def flat_clipped_grads(loss_fn, params, examples, ids, key, clip_norm):
    """(B, d) clipped per-example gradients, flattened."""
    keys = jax.vmap(lambda i: clipping.example_key(key, i))(ids)
    mask = jnp.ones(ids.shape, bool)
    clipped, stats = jax.vmap(lambda ex, k, m: clipping.clipped_example_grad(loss_fn, clip_norm, params, ex, k, m))(
        examples, keys, mask)
    flat = jnp.concatenate([g.reshape(g.shape[0], -1) for g in jax.tree.leaves(clipped)], axis=1)
    return flat, stats.norm_sum


def measure(config, params, data, k, num_examples, chunk, seed):
    config.diffusion.noise_multiplicity = k
    model = experiment.build_model(config)
    loss_fn = experiment.per_example_loss(config, model)
    fn = jax.jit(lambda p, ex, ids, key: flat_clipped_grads(loss_fn, p, ex, ids, key, config.dp.clip_norm))
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(data.images), num_examples, replace=False)
    half = num_examples // 2
    sums = [0.0, 0.0]
    sq, norms = 0.0, []
    key = jax.random.key(seed)
    tic = time.time()
    for start in range(0, num_examples, chunk):
        ids = idx[start:start + chunk]
        ex = experiment.host_examples(data, ids, config.data.conditional)
        flat, norm = fn(params, ex, jnp.asarray(ids, jnp.int32), key)
        flat = np.asarray(flat, np.float64)
        norms.extend(np.asarray(norm).ravel().tolist())
        sq += float((flat ** 2).sum())
        sums[0 if start < half else 1] = sums[0 if start < half else 1] + flat.sum(0)
    mean_a, mean_b = sums[0] / half, sums[1] / (num_examples - half)
    mu2 = float(mean_a @ mean_b)
    # Which parameters carry the mean direction: ||mu||^2 split by parameter array.
    names = ["/".join(str(getattr(k, "key", k)) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
    bounds = np.cumsum([0] + sizes)
    share = {n: float(mean_a[a:b] @ mean_b[a:b]) / mu2 for n, a, b in zip(names, bounds[:-1], bounds[1:])}
    top = dict(sorted(share.items(), key=lambda kv: -kv[1])[:8])
    return {"k": k, "examples": num_examples, "seconds": time.time() - tic, "num_params": int(mean_a.size),
            "mean_unclipped_norm": float(np.mean(norms)), "mean_sq_clipped_norm": sq / num_examples,
            "mu_norm_sq_unbiased": mu2, "mu_norm": math.sqrt(max(mu2, 0.0)),
            "cosine_halves": float(mu2 / (np.linalg.norm(mean_a) * np.linalg.norm(mean_b))),
            "mu_norm_sq_share_top": top}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="a run of configs/quickstart.py (its latest checkpoint)")
    p.add_argument("--init", action="store_true", help="the initial parameters instead")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--epsilon", type=float, default=10.0)
    p.add_argument("--settings", default="256:1.25,512:1.25,1024:1.25,1024:2.5,2048:5",
                   help="batch:epochs pairs to project (noise calibrated at --epsilon)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides of the run, e.g. model.nf=8 (VALUE as a Python literal)")
    args = p.parse_args()

    config = quickstart.get_config()
    for item in args.set:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = ast.literal_eval(value)
    config.data.fetch = True
    data = experiment.load_training_data(config)
    model = experiment.build_model(config)
    if args.init:
        params = experiment.init_variables(model, jax.random.key(args.seed))["params"]
    else:
        template = checkpoint.state_template(model, experiment.make_optimizer(config))
        ckpt = checkpoint.Checkpointer(os.path.join(args.workdir, "checkpoints"))
        state, _ = ckpt.restore_latest(template)
        ckpt.close()
        params = state.params
    results = [measure(config, params, data, k, args.examples, args.chunk, args.seed) for k in args.ks]

    n = len(data.images)
    projections = []
    for item in args.settings.split(","):
        batch, epochs = item.split(":")
        config.dp.batch_size, config.dp.epochs = int(batch), float(epochs)
        schedule = experiment.privacy_schedule(config, n)  # the q and T a run with these settings uses
        q, steps, qn = schedule.sampling_rate, schedule.num_steps, schedule.expected_batch_size
        sigma = accounting.calibrate_noise_multiplier(args.epsilon, q, steps, config.dp.delta)
        for r in results:
            dp_noise = sigma * config.dp.clip_norm * math.sqrt(r["num_params"]) / qn
            sampling_noise = math.sqrt(max(r["mean_sq_clipped_norm"] - r["mu_norm_sq_unbiased"], 0.0) / qn)
            snr = r["mu_norm"] / math.hypot(dp_noise, sampling_noise)
            projections.append({"batch": qn, "epochs": float(epochs), "steps": steps, "sigma": sigma,
                                "k": r["k"], "compute_examples_x_k": qn * steps * r["k"],
                                "dp_noise_norm_on_mean": dp_noise, "sampling_noise_norm": sampling_noise,
                                "snr_per_step": snr, "steps_x_snr_sq": steps * snr ** 2})
    print(json.dumps({"workdir": None if args.init else args.workdir, "epsilon": args.epsilon,
                      "measured": results, "projections": projections}, indent=1))


if __name__ == "__main__":
    main()
