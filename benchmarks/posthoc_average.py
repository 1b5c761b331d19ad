"""Post-hoc iterate averaging: is a longer average than the training EMA worth having under DP noise?

Averages the RAW parameters of several saved checkpoints of one run (uniformly) and writes them,
as the EMA weights, into a new workdir holding one checkpoint (the newest step's state and
metadata otherwise), so that `--mode=eval` / `--mode=sample` score the average like any run:

    python benchmarks/posthoc_average.py --config=configs/mnist_cpu.py \
        --checkpoints=runs/mnist_cpu_ckpts --steps 350 400 450 500 550 590 --out=runs/mnist_cpu_avg350
    python -m dpdm_jax.main --config=configs/mnist_cpu.py --workdir=runs/mnist_cpu_avg350 --mode=eval

Averaging DP-SGD iterates is post-processing of the released parameters: it changes no guarantee.
The training EMA (decay min(0.999, (1+n)/(10+n))) averages over roughly the last n/9 steps; the
average here can span any window the kept checkpoints cover (keep them with
`--config.training.keep_checkpoints`). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpdm_jax import checkpoint, experiment  # noqa: E402


def load_config(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's config file (same model and optimiser)")
    parser.add_argument("--checkpoints", required=True, help="directory of the run's step checkpoints")
    parser.add_argument("--steps", type=int, nargs="+", required=True, help="checkpoint steps to average")
    parser.add_argument("--out", required=True, help="new workdir (its checkpoints/ gets one checkpoint)")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    exp = experiment.build(config, with_data=False)
    template = checkpoint.state_template(exp.model, exp.optimizer)
    source = checkpoint.Checkpointer(args.checkpoints, max_to_keep=1000)
    total, newest = None, None
    for step in sorted(args.steps):
        state, meta = source.restore(step, template)
        params = jax.tree.map(lambda x: np.asarray(x, np.float64), state.params)
        total = params if total is None else jax.tree.map(np.add, total, params)
        newest = (step, state, meta)
    source.close()
    step, state, meta = newest
    average = jax.tree.map(lambda s, p: (s / len(args.steps)).astype(p.dtype), total, state.params)
    ema_distance = float(np.sqrt(sum(np.sum((np.asarray(a, np.float64) - np.asarray(e, np.float64)) ** 2)
                                     for a, e in zip(jax.tree.leaves(average), jax.tree.leaves(state.ema_params)))))
    out = checkpoint.Checkpointer(os.path.join(args.out, "checkpoints"))
    out.save(step, state.replace(ema_params=average), meta)
    out.close()
    result = {"averaged_steps": sorted(args.steps), "written_as_step": step, "out": args.out,
              "l2_distance_average_to_training_ema": ema_distance}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
