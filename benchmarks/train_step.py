"""Seconds per DP-SGD step of a config's own training program, with dp_memory.py's inputs beside it.

Builds what `--mode=train` builds (experiment.build: the config's data, model, per-example loss,
optimiser, DP plan, Poisson sampler and chunk size) and times `--steps` logical steps for each
variant, each in a fresh subprocess, one after another on the same host:

  train          the run's own initial parameters and real training images (what train.py runs)
  random_params  dp_memory.py's parameters (each entry N(0, 0.02^2)) on the real images
  random_data    the run's own parameters on dp_memory.py's images (uniform in [-1, 1])

so a difference between the training loop and the synthetic benchmark shows up as a difference
between variants measured minutes apart, not sessions apart. Steps are timed from the first
chunk to the updated parameters (host batch selection included); the first `--warmup` steps
(compilation) are left out of the means.

Timing only: a fixed, public seed and no checkpoint or sample is written.

    python benchmarks/train_step.py --config configs/quickstart.py --steps 12
    python benchmarks/train_step.py --variants train --set training.chunk_size=8

Prints one JSON object to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = ("train", "random_params", "random_data")


def load_config(spec: str, overrides: list[str]):
    """The config `--config=spec --config.FIELD=VALUE ...` gives dpdm_jax.main (same parser, same types)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["train_step", f"--config={spec}", *(f"--config.{item}" for item in overrides)]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def worker(cfg: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dpdm_jax import experiment
    from dpdm_jax.dp import data_mesh, run_keys

    config = load_config(cfg["config"], cfg["overrides"])
    experiment.validate_config(config)
    exp = experiment.build(config)
    seed = 0  # public: timing only
    run_key, _, init_key = run_keys(seed)
    params = experiment.init_variables(exp.model, init_key)["params"]
    rng = np.random.default_rng(0)
    if cfg["variant"] == "random_params":
        params = jax.tree.map(lambda p: jnp.asarray(0.02 * rng.standard_normal(p.shape, np.float32)), params)
    mesh = data_mesh()
    dp_step = exp.plan.step(exp.per_example_loss, exp.optimizer, mesh=mesh,
                            microbatch_size=config.training.microbatch_size or None,
                            ema_max_decay=config.optim.ema_max_decay)
    selection = exp.plan.sampler(config.training.chunk_size, num_devices=mesh.size)
    conditional = exp.spec.num_classes is not None
    state = dp_step.init(params)

    def chunks(step, counter):
        for c in selection.iter_chunks(seed, step):
            examples = experiment.host_examples(exp.data, c.indices, conditional)
            if cfg["variant"] == "random_data":
                examples["image"] = rng.uniform(-1, 1, examples["image"].shape).astype(np.float32)
            counter.append(1)
            yield examples, c.indices, c.mask

    seconds, num_chunks = [], []
    for step in range(cfg["warmup"] + cfg["steps"]):
        counter = []
        tic = time.perf_counter()
        state, _ = dp_step(state, chunks(step, counter), run_key, step)
        jax.block_until_ready(state.params)
        seconds.append(time.perf_counter() - tic)
        num_chunks.append(len(counter))
    timed, timed_chunks = seconds[cfg["warmup"]:], num_chunks[cfg["warmup"]:]
    return {"variant": cfg["variant"], "s_per_step": round(float(np.mean(timed)), 3),
            "s_per_step_median": round(float(np.median(timed)), 3),
            "s_per_chunk": round(float(np.sum(timed) / max(1, np.sum(timed_chunks))), 4),
            "chunks_per_step": round(float(np.mean(timed_chunks)), 2),
            "first_steps_s": [round(s, 2) for s in seconds[:cfg["warmup"]]],
            "step_s": [round(s, 2) for s in timed], "chunk_size": config.training.chunk_size,
            "expected_batch_size": exp.plan.expected_batch_size,
            "noise_multiplicity": config.diffusion.noise_multiplicity, "conv_impl": config.model.conv_impl}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart.py"), help="config file[:preset]")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=12, help="timed logical steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="config overrides, e.g. training.chunk_size=8 diffusion.noise_multiplicity=2")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per variant")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    sys.path.insert(0, HERE)
    from per_example_grads import worker_environment  # the training command's allocator

    env, allocator = worker_environment()
    out = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(), "config": args.config, "overrides": args.set, "allocator": allocator,
           "results": []}
    for variant in args.variants:
        cfg = dict(config=args.config, variant=variant, steps=args.steps, warmup=args.warmup,
                   overrides=args.set)
        try:
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                               stdout=subprocess.PIPE, text=True, env=env, timeout=args.timeout, cwd=ROOT)
            lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
            out["results"].append(json.loads(lines[-1][7:]) if lines else {"variant": variant,
                                                                           "error": f"rc={r.returncode}"})
        except subprocess.TimeoutExpired:
            out["results"].append({"variant": variant, "error": f"timeout {args.timeout}s"})
        print(json.dumps(out["results"][-1]), file=sys.stderr, flush=True)
    out["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
