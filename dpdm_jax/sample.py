"""Draw images from trained (EMA) weights: used for training grids and `--mode=sample`.

`--mode=sample` draws from a run's checkpoint (`sampling.checkpoint_step`) or from a release
alone (`sampling.release=DIR`, written by `--mode=export`). It writes `samples_step<k>.npz`, a
PNG grid, a manifest with the guarantee the samples inherit, and with `sampling.write_png=True`
an ImageFolder tree `samples/step<k>/<class name>/<i>.png` (flat if unconditional) with its own
manifest.json. Images are drawn batch by batch with progress and ETA. The sampling randomness is
`sampling.seed` (public; -1 draws a fresh one), never the training seed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from dpdm_jax import checkpoint, experiment, release
from dpdm_jax.checkpoint import ledger_from_metadata
from dpdm_jax.data import folder_class_names, from_model_range, inspect_npz
from dpdm_jax.diffusion import get_parameterisation, make_denoise_fn, resolve_labels, sample_images
from dpdm_jax.dp import run_key_from_seed
from dpdm_jax.metrics import format_eta, save_image_grid


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


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
    """Label i's public name (folder names, an npz's class_names, else 'i'); None if unconditional."""
    spec = experiment.image_spec(config)
    if spec.num_classes is None:
        return None
    names = None
    if config.data.name == "folder":
        names = folder_class_names(config.data.path)
    elif config.data.name == "npz":
        names = inspect_npz(config.data.path).class_names
    return tuple(names) if names is not None else tuple(str(i) for i in range(spec.num_classes))


@dataclasses.dataclass(frozen=True)
class Source:
    """What samples are drawn from: a network, its EMA params, and the guarantee they carry."""

    model: object
    params: object
    parameterisation: str
    step: int
    class_names: tuple[str, ...] | None
    privacy: dict  # release.privacy_manifest fields
    origin: dict  # where the weights came from (checkpoint step / release and its weights digest)

    @property
    def image_shape(self):
        return (self.model.image_size, self.model.image_size, self.model.in_channels)

    @property
    def num_classes(self):
        return self.model.num_classes


def checkpoint_source(config: ml_collections.ConfigDict, workdir: str) -> Source:
    exp = experiment.build(config, with_data=False)
    model, ema_params, meta = restore_ema_params(exp, workdir, config.sampling.checkpoint_step)
    ledger = ledger_from_metadata(meta)
    return Source(model, ema_params, config.diffusion.parameterisation, int(meta["step"]), class_names(config),
                  release.privacy_manifest(ledger),
                  {"checkpoint_step": int(meta["step"]), "workdir": os.path.abspath(workdir),
                   "ledger": ledger.to_dict()})


def release_source(directory: str, conv_impl: str = "auto") -> Source:
    r = release.load_release(directory, conv_impl)
    privacy = {k: r.manifest.get(k) for k in release.PRIVACY_FIELDS + ("dataset",)}
    return Source(r.model, r.params, r.parameterisation, int(r.manifest["step"]), r.class_names, privacy,
                  {"release": r.directory, "weights_sha256": r.manifest["files"][release.WEIGHTS]})


def sampling_seed(seed: int) -> int:
    """-1: a fresh seed from the OS; else the given one. Public either way: it is post-processing."""
    return secrets.randbits(62) if seed < 0 else int(seed)


def _png_dirname(name: str) -> str:
    """A class name as one safe path component."""
    safe = name.replace(os.sep, "_").replace("/", "_").strip()
    return safe if safe and safe not in (".", "..") else "_"


def draw_batches(source: Source, s: ml_collections.ConfigDict, key: jax.Array):
    """Yield (uint8 images, labels or None) batch by batch: sampling.num_samples in all.

    Every batch has the full sampling.batch_size (the last one is cut), so one program is compiled.
    """
    n = s.num_samples
    bs = min(s.batch_size, n)
    labels = resolve_labels(s.labels, n, source.num_classes)
    if isinstance(labels, str):  # 'uniform': i.i.d. classes, from the sampling key
        labels = np.asarray(jax.random.randint(jax.random.fold_in(key, 2**31 - 1), (n,), 0, source.num_classes), np.int32)
    elif labels is not None and np.ndim(labels) == 0:
        labels = np.full(n, int(labels), np.int32)
    denoise_fn = make_denoise_fn(experiment.model_apply_fn(source.model), source.params,
                                 get_parameterisation(source.parameterisation))
    name, options = sampler_options(s)
    guidance = s.guidance_weight if source.num_classes is not None else 0.0
    padded = None if labels is None else np.resize(labels, -(-n // bs) * bs)
    for b, start in enumerate(range(0, n, bs)):
        count = min(bs, n - start)
        batch_labels = None if padded is None else padded[start:start + bs]
        images, _ = sample_images(denoise_fn, jax.random.fold_in(key, b), bs, bs, source.image_shape, sampler=name,
                                  sampler_kwargs=options, labels=batch_labels, num_classes=source.num_classes,
                                  guidance_weight=guidance)
        yield from_model_range(images[:count]), None if labels is None else labels[start:start + count]


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
    """--mode=sample: samples.npz (uint8 images, labels), a PNG grid, a manifest (and a PNG tree);
    returns the npz path."""
    s = config.sampling
    if s.release:
        experiment.validate_sampling(s, None)
        source = release_source(s.release, config.model.conv_impl)
        experiment.validate_sampling(s, source.num_classes)
    else:
        experiment.validate_config(config)
        source = checkpoint_source(config, workdir)
    step, n = source.step, s.num_samples
    out_dir = os.path.join(workdir, "samples")
    png_dir = os.path.join(out_dir, f"step{step}")
    if s.write_png and os.path.exists(png_dir) and os.listdir(png_dir):
        raise ValueError(f"{png_dir} already exists and is not empty: move it away or use another --workdir")
    os.makedirs(out_dir, exist_ok=True)
    seed = sampling_seed(s.seed)
    logging.info("Sampling %d images from the EMA weights of step %d (%s) with %s, sampling.seed=%d. Privacy: %s",
                 n, step, "release " + s.release if s.release else "checkpoint", s.sampler, seed,
                 source.privacy["guarantee"])
    images, labels, tic = [], [], time.time()
    for batch, batch_labels in draw_batches(source, s, run_key_from_seed(seed)):
        if s.write_png:
            _write_pngs(png_dir, batch, batch_labels, source.class_names, sum(len(x) for x in images), n)
        images.append(batch)
        labels.append(batch_labels)
        done, rate = sum(len(x) for x in images), sum(len(x) for x in images) / max(time.time() - tic, 1e-9)
        logging.info("sampled %d/%d images  %.2f images/s  ETA %s", done, n, rate, format_eta((n - done) / rate))
    images = np.concatenate(images)
    labels = None if labels[0] is None else np.concatenate(labels)
    path = os.path.join(out_dir, f"samples_step{step}.npz")
    np.savez_compressed(path, images=images, labels=np.zeros(0, np.int32) if labels is None else labels)
    save_image_grid(images[: min(n, 100)], os.path.join(out_dir, f"samples_step{step}.png"))
    manifest = {"samples": os.path.basename(path), "step": step, "num_samples": n, "sampler": s.sampler,
                "sampler_options": sampler_options(s)[1], "guidance_weight": s.guidance_weight,
                "sampling_seed": seed, "image_shape": list(source.image_shape),
                "class_names": None if source.class_names is None else list(source.class_names),
                "privacy": source.privacy["guarantee"], "has_guarantee": source.privacy["has_guarantee"],
                "guarantee": source.privacy, "source": source.origin,
                "png_tree": os.path.basename(png_dir) if s.write_png else None}
    with open(os.path.join(out_dir, f"samples_step{step}.json"), "w") as f:  # the manifest of the npz
        json.dump(manifest, f, indent=2)
    if s.write_png:
        with open(os.path.join(png_dir, "manifest.json"), "w") as f:
            json.dump({**manifest, "layout": "ImageFolder: <class name>/<index>.png" if labels is not None
                       else "flat: <index>.png (unconditional)"}, f, indent=2)
    logging.info("Wrote %s, its PNG grid and manifest%s. Privacy: %s", path,
                 f" and the PNG tree {png_dir}" if s.write_png else "", source.privacy["guarantee"])
    return path


def _write_pngs(png_dir: str, images: np.ndarray, labels, names, offset: int, total: int) -> None:
    width = len(str(total - 1))
    for j, img in enumerate(images):
        sub = "" if labels is None else _png_dirname(names[labels[j]] if names else str(labels[j]))
        os.makedirs(os.path.join(png_dir, sub), exist_ok=True)
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(
            os.path.join(png_dir, sub, f"{offset + j:0{width}d}.png"))
