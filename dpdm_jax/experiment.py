"""Turn a config into explicit objects, once: `build(config)` -> an `Experiment`.

    Experiment(data, spec, model, per_example_loss, optimizer, plan, sampling, eval)

Configs are read here, at the edge; the modes (train, sample, evaluate) call `validate_config` and
`build` once and hand the plain objects down; the libraries below never see a ConfigDict.
"""
from __future__ import annotations

import dataclasses
import math

import ml_collections
import numpy as np
import optax
from absl import logging

from dpdm_jax.config_check import (DATASET_INFO, DATASET_NAMES, USER_DATASETS, ImageSpec,  # noqa: F401
                                   image_spec, sampler_options, validate_config, validate_sampling)
from dpdm_jax.data import Dataset, load_dataset, load_image_folder, load_npz, synthetic_dataset, to_model_range
from dpdm_jax.diffusion import get_parameterisation, make_per_example_loss
from dpdm_jax.dp.sampling import expected_batch_size
from dpdm_jax.dp import DPPlan, PrivacyLedger, calibrate_noise_multiplier, validate_dp_params
from dpdm_jax.models import DDPMpp, init_variables  # noqa: F401  (init_variables: used by the modes)

# validate_config, image_spec and the dataset tables live in config_check (imported above, used by the
# modes as experiment.*): the checks that need no data or compute, apart from the building here.


@dataclasses.dataclass(frozen=True)
class PrivacySchedule:
    """What the Poisson batch selection runs and the accountant is told (one source for both)."""

    dataset_size: int  # N
    sampling_rate: float  # q = 1 / ceil(N / batch_size), the Poisson batch-selection rate
    num_steps: int  # T = epochs * ceil(N / batch_size) DP steps (not the image sampler's steps)

    @property
    def expected_batch_size(self) -> float:
        return expected_batch_size(self.sampling_rate, self.dataset_size)


def load_public_split(config: ml_collections.ConfigDict, split: str) -> Dataset:
    """A whole split of a public dataset (data.name), from data.data_dir / data.tfds_dir, fetched if data.fetch."""
    d = config.data
    return load_dataset(d.name, split, d.data_dir or None, fetch=d.fetch, tfds_dir=d.tfds_dir or None)


def load_training_data(config: ml_collections.ConfigDict) -> Dataset:
    """The private training set, as uint8 in memory."""
    d = config.data
    if d.name == "synthetic":
        data = synthetic_dataset(d.synthetic_size, d.synthetic_image_size, d.synthetic_channels,
                                 d.synthetic_num_classes, seed=0)
    elif d.name == "folder":
        data = load_image_folder(d.path, d.image_size, d.channels)
    elif d.name == "npz":
        data = load_npz(d.path, d.image_size, d.channels)
    else:
        data = load_public_split(config, "train")
    if data.class_names is not None:
        logging.info("%s: %d images; label i is class %s", data.name, len(data),
                     dict(enumerate(data.class_names)))
    if d.max_examples > 0:
        data = dataclasses.replace(data, images=data.images[: d.max_examples],
                                   labels=None if data.labels is None else data.labels[: d.max_examples])
    spec = image_spec(config)
    if data.images.shape[1:] != spec.shape:
        raise ValueError(f"{d.name}: images have shape {data.images.shape[1:]}, expected {spec.shape}")
    if len(data.images) == 0:
        raise ValueError(f"{d.name}: the training set is empty")
    if spec.num_classes is not None and data.labels is None:
        raise ValueError(f"{d.name}: a class-conditional model needs labels")
    return data


def privacy_schedule(config: ml_collections.ConfigDict, dataset_size: int) -> PrivacySchedule:
    """q = 1/ceil(N/B) and T = epochs * ceil(N/B), as in the paper's reference table."""
    batches_per_epoch = math.ceil(dataset_size / config.dp.batch_size)
    return PrivacySchedule(
        dataset_size=dataset_size,
        sampling_rate=1.0 / batches_per_epoch,
        num_steps=max(1, int(round(config.dp.epochs * batches_per_epoch))),
    )


def make_plan(config: ml_collections.ConfigDict, schedule: PrivacySchedule) -> DPPlan:
    """Validate the DP parameters, calibrate sigma for the target epsilon (or take it as given).

    Refuses, before any compute, an explicit noise multiplier that would spend more than the
    target epsilon over the planned steps. dp.enabled=False gives the non-private baseline.
    """
    dp = config.dp
    if not dp.enabled:
        return DPPlan(dataset_size=schedule.dataset_size, sampling_rate=schedule.sampling_rate,
                      num_steps=schedule.num_steps, noise_multiplier=0.0, delta=float(dp.delta), clip_norm=None,
                      accountant=dp.accountant, target_epsilon=None, private=False)
    validate_dp_params(
        target_epsilon=dp.epsilon, delta=dp.delta, dataset_size=schedule.dataset_size,
        expected_batch_size=schedule.expected_batch_size, steps=schedule.num_steps,
        clip_norm=dp.clip_norm, noise_multiplicity=config.diffusion.noise_multiplicity,
        allow_delta_above_1_over_n=dp.allow_delta_above_1_over_n,
    )
    if dp.noise_multiplier >= 0:
        sigma = float(dp.noise_multiplier)
    else:
        sigma = calibrate_noise_multiplier(dp.epsilon, schedule.sampling_rate, schedule.num_steps,
                                           dp.delta, dp.accountant)
    plan = DPPlan(dataset_size=schedule.dataset_size, sampling_rate=schedule.sampling_rate,
                  num_steps=schedule.num_steps, noise_multiplier=sigma, delta=float(dp.delta),
                  clip_norm=float(dp.clip_norm), accountant=dp.accountant, target_epsilon=float(dp.epsilon))
    plan.check_within_target()
    return plan


def make_ledger(config: ml_collections.ConfigDict, schedule: PrivacySchedule,
                seed_secret: bool | None = None) -> PrivacyLedger:
    """The ledger of `make_plan` (seed_secret default: the config's seed is -1, i.e. fresh and secret)."""
    return make_plan(config, schedule).ledger(config.seed < 0 if seed_secret is None else seed_secret)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.optim
    return optax.adam(o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps)


def build_model(config: ml_collections.ConfigDict) -> DDPMpp:
    spec = image_spec(config)
    m = config.model
    return DDPMpp(
        image_size=spec.image_size, in_channels=spec.channels, num_classes=spec.num_classes,
        nf=m.nf, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout, conv_impl=m.conv_impl,
    )


@dataclasses.dataclass(frozen=True)
class _ModelApply:
    """Hashable and equal for equal models, so jitted samplers/steps hit their compile caches."""

    model: DDPMpp

    def __call__(self, params, x, c_noise, labels):
        return self.model.apply({"params": params}, x, c_noise, labels, train=False)


def model_apply_fn(model: DDPMpp) -> _ModelApply:
    """F(params, x_in (B,H,W,C), c_noise (B,), labels (B,) or None) -> (B,H,W,C)."""
    return _ModelApply(model)


def make_parameterisation(config: ml_collections.ConfigDict):
    """The config's diffusion parameterisation; EDM with the config's training noise law."""
    d = config.diffusion
    if d.parameterisation == "edm":
        return get_parameterisation("edm", p_mean=float(d.edm_p_mean), p_std=float(d.edm_p_std))
    return get_parameterisation(d.parameterisation)


def per_example_loss(config: ml_collections.ConfigDict, model: DDPMpp):
    return make_per_example_loss(
        model_apply_fn(model),
        make_parameterisation(config),
        config.diffusion.noise_multiplicity,
        image_spec(config).num_classes,
        config.diffusion.label_dropout,
    )


def host_examples(data: Dataset, indices: np.ndarray, conditional: bool) -> dict:
    """Rows `indices` as model inputs: {'image': float32 [-1, 1] (B,H,W,C), 'label': int32 (B,)}."""
    labels = data.labels[indices] if conditional else np.zeros(len(indices), np.int32)
    return {"image": to_model_range(data.images[indices]), "label": np.asarray(labels, np.int32)}


@dataclasses.dataclass(frozen=True)
class ImageSampling:
    """How images are drawn from a trained denoiser (sampling.*): the image sampler, not batch selection.

    num_steps in `options` counts the sampler's denoising steps (not DP steps).
    """

    spec: ImageSpec
    parameterisation: object  # a diffusion parameterisation (diffusion.get_parameterisation)
    sampler: str  # one of diffusion.SAMPLERS
    options: dict  # the sampler's keyword options (num_steps, EDM churn)
    batch_size: int
    guidance_weight: float  # 0 for unconditional models
    labels: object  # sampling.labels: 'balanced', 'uniform' or a class index (diffusion.resolve_labels)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """eval.* as plain values."""

    num_samples: int
    fid_batch_size: int
    fid_reference_images: int  # 0: the whole train split
    classifier_epochs: int
    classifiers: tuple
    inception_weights: str | None
    fid_stats_dir: str | None
    kid: bool
    kid_reference_images: int
    kid_num_subsets: int
    label_accuracy: bool
    label_classifier_epochs: int


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a mode needs, built from the config once (data and plan: only when asked for)."""

    spec: ImageSpec
    model: DDPMpp
    per_example_loss: object  # (params, example, key) -> scalar, for dp.DPPlan.step
    optimizer: optax.GradientTransformation
    sampling: ImageSampling
    eval: EvalSettings
    data: Dataset | None = None  # the private training set (with_data=True)
    plan: DPPlan | None = None  # the DP plan over that data (with_data=True)


def image_sampling(config: ml_collections.ConfigDict) -> ImageSampling:
    spec = image_spec(config)
    name, options = sampler_options(config.sampling)
    s = config.sampling
    return ImageSampling(spec=spec, parameterisation=make_parameterisation(config),
                         sampler=name, options=options, batch_size=int(s.batch_size),
                         guidance_weight=float(s.guidance_weight) if spec.num_classes is not None else 0.0,
                         labels=s.labels)


def eval_settings(config: ml_collections.ConfigDict) -> EvalSettings:
    e = config.eval
    return EvalSettings(num_samples=e.num_samples, fid_batch_size=e.fid_batch_size,
                        fid_reference_images=e.fid_reference_images, classifier_epochs=e.classifier_epochs,
                        classifiers=tuple(e.classifiers), inception_weights=e.inception_weights or None,
                        fid_stats_dir=e.fid_stats_dir or None, kid=e.kid, kid_reference_images=e.kid_reference_images,
                        kid_num_subsets=e.kid_num_subsets, label_accuracy=e.label_accuracy,
                        label_classifier_epochs=e.label_classifier_epochs)


def build(config: ml_collections.ConfigDict, with_data: bool = True) -> Experiment:
    """The config as explicit objects (call validate_config first). with_data: load the training set
    and make the DP plan (train); sample and eval restore weights and need neither."""
    data = load_training_data(config) if with_data else None
    plan = make_plan(config, privacy_schedule(config, len(data.images))) if with_data else None
    model = build_model(config)
    return Experiment(spec=image_spec(config), model=model, per_example_loss=per_example_loss(config, model),
                      optimizer=make_optimizer(config), sampling=image_sampling(config), eval=eval_settings(config),
                      data=data, plan=plan)
