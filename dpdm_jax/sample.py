"""Draw images from trained (EMA) weights: used for training grids and `--mode=sample`."""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from dpdm_jax import experiment
import json

from dpdm_jax import checkpoint
from dpdm_jax.checkpoint import ledger_from_metadata
from dpdm_jax.data import from_model_range
from dpdm_jax.diffusion import make_denoise_fn, resolve_labels, sample_images
from dpdm_jax.metrics import save_image_grid


sampler_options = experiment.sampler_options


def generate(sampling: experiment.ImageSampling, model, params, num_samples: int, key: jax.Array,
             labels=None) -> tuple[np.ndarray, np.ndarray | None]:
    """`num_samples` uint8 images (N,H,W,C) and their labels from `params` (use the EMA weights)."""
    spec = sampling.spec
    denoise_fn = make_denoise_fn(experiment.model_apply_fn(model), params, sampling.parameterisation)
    if labels is None:
        labels = resolve_labels(sampling.labels, num_samples, spec.num_classes)
    images, labels = sample_images(
        denoise_fn, key, num_samples, min(sampling.batch_size, num_samples), spec.shape,
        sampler=sampling.sampler, sampler_kwargs=sampling.options, labels=labels, num_classes=spec.num_classes,
        guidance_weight=sampling.guidance_weight,
    )
    return from_model_range(images), labels


def restore_ema_params(exp: experiment.Experiment, workdir: str, step: int = -1):
    """(model, EMA params, checkpoint metadata) from `workdir/checkpoints` (step < 0: the latest)."""
    template = checkpoint.state_template(exp.model, exp.optimizer)
    ema_params, meta = checkpoint.restore_ema_params(os.path.join(workdir, "checkpoints"), template, step)
    return exp.model, ema_params, meta


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
    """--mode=sample: write samples.npz (uint8 images, labels) and a PNG grid; returns the npz path."""
    experiment.validate_config(config)
    exp = experiment.build(config, with_data=False)
    model, ema_params, meta = restore_ema_params(exp, workdir, config.sampling.checkpoint_step)
    step = int(meta["step"])
    n = config.sampling.num_samples
    # Sampling is post-processing of DP weights: its randomness need not be secret.
    key = jax.random.fold_in(jax.random.key(max(config.seed, 0)), step)
    logging.info("Sampling %d images from the EMA weights of step %d with %s.", n, step, config.sampling.sampler)
    images, labels = generate(exp.sampling, model, ema_params, n, key)
    out_dir = os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"samples_step{step}.npz")
    np.savez_compressed(path, images=images, labels=np.zeros(0, np.int32) if labels is None else labels)
    save_image_grid(images[: min(n, 100)], os.path.join(out_dir, f"samples_step{step}.png"))
    ledger = ledger_from_metadata(meta)
    with open(os.path.join(out_dir, f"samples_step{step}.json"), "w") as f:  # the manifest of the npz
        json.dump({"samples": os.path.basename(path), "step": step, "num_samples": n,
                   "sampler": config.sampling.sampler, "privacy": ledger.guarantee(),
                   "has_guarantee": ledger.has_guarantee, "ledger": ledger.to_dict()}, f, indent=2)
    logging.info("Wrote %s, its PNG grid and manifest. Privacy: %s", path, ledger.guarantee())
    return path
