"""Turn a config into explicit objects: data, network, loss, privacy schedule, ledger.

Configs are read here, at the edge; everything below receives plain arguments.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dpdm_jax.data import Dataset, load_dataset, synthetic_dataset, to_model_range
from dpdm_jax.diffusion import get_parameterisation, make_per_example_loss
from dpdm_jax.dp import PrivacyLedger, calibrate_noise_multiplier, validate_dp_params
from dpdm_jax.models import DDPMpp

# image size, channels, number of classes (None: the dataset has no labels we use).
DATASET_INFO = {
    "mnist": (28, 1, 10),
    "fashion_mnist": (28, 1, 10),
    "cifar10": (32, 3, 10),
    "celeba32": (32, 3, None),
    "celeba64": (64, 3, None),
    "imagenet32": (32, 3, 1000),
}
PARAMETERISATIONS = ("vp", "ve", "v", "edm")
SAMPLERS = ("ddim", "ddim_stochastic", "edm")


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    image_size: int
    channels: int
    num_classes: int | None  # None: unconditional model

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)


@dataclasses.dataclass(frozen=True)
class PrivacySchedule:
    """What the sampler runs and the accountant is told (one source for both)."""

    dataset_size: int  # N
    sampling_rate: float  # q = 1 / ceil(N / batch_size)
    num_steps: int  # T = epochs * ceil(N / batch_size)

    @property
    def expected_batch_size(self) -> float:
        return self.sampling_rate * self.dataset_size


def image_spec(config: ml_collections.ConfigDict) -> ImageSpec:
    name = config.data.name
    if name == "synthetic":
        size, channels, classes = (config.data.synthetic_image_size, config.data.synthetic_channels,
                                   config.data.synthetic_num_classes)
    elif name in DATASET_INFO:
        size, channels, classes = DATASET_INFO[name]
    else:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(DATASET_INFO) + ['synthetic']}")
    if config.data.conditional and classes is None:
        raise ValueError(f"data.conditional=True but {name} has no class labels; set data.conditional=False")
    return ImageSpec(size, channels, classes if config.data.conditional else None)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks that need no data and no compute: fail before anything expensive starts."""
    image_spec(config)
    if config.diffusion.parameterisation not in PARAMETERISATIONS:
        raise ValueError(f"diffusion.parameterisation must be one of {PARAMETERISATIONS}, "
                         f"got {config.diffusion.parameterisation!r}")
    if config.sampling.sampler not in SAMPLERS:
        raise ValueError(f"sampling.sampler must be one of {SAMPLERS}, got {config.sampling.sampler!r}")
    k = config.diffusion.noise_multiplicity
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"diffusion.noise_multiplicity K must be an integer >= 1, got {k!r}")
    if not 0 <= config.diffusion.label_dropout < 1:
        raise ValueError(f"diffusion.label_dropout must be in [0, 1), got {config.diffusion.label_dropout}")
    if config.model.dropout != 0:
        raise ValueError("model.dropout must be 0 (DPDM trains without dropout)")
    t = config.training
    n_dev = jax.device_count()
    if t.chunk_size < 1 or t.chunk_size % n_dev:
        raise ValueError(f"training.chunk_size={t.chunk_size} must be a positive multiple of the "
                         f"device count {n_dev}")
    if t.microbatch_size < 0 or (t.microbatch_size and (t.chunk_size // n_dev) % t.microbatch_size):
        raise ValueError(f"training.microbatch_size={t.microbatch_size} must divide the per-device "
                         f"chunk {t.chunk_size // n_dev}")
    if config.dp.accountant not in ("rdp", "pld"):
        raise ValueError(f"dp.accountant must be 'rdp' or 'pld', got {config.dp.accountant!r}")
    if not isinstance(config.dp.batch_size, int) or config.dp.batch_size < 1:
        raise ValueError(f"dp.batch_size must be a positive integer, got {config.dp.batch_size!r}")
    if not config.dp.epochs > 0:
        raise ValueError(f"dp.epochs must be > 0, got {config.dp.epochs}")


def load_training_data(config: ml_collections.ConfigDict) -> Dataset:
    """The private training set, as uint8 in memory."""
    d = config.data
    if d.name == "synthetic":
        data = synthetic_dataset(d.synthetic_size, d.synthetic_image_size, d.synthetic_channels,
                                 d.synthetic_num_classes, seed=0)
    else:
        data = load_dataset(d.name, "train", d.data_dir or None)
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


def make_ledger(config: ml_collections.ConfigDict, schedule: PrivacySchedule) -> PrivacyLedger:
    """Validate the DP parameters, then calibrate sigma for the target epsilon (or take it as given)."""
    dp = config.dp
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
    ledger = PrivacyLedger(
        dataset_size=schedule.dataset_size, sampling_rate=schedule.sampling_rate,
        noise_multiplier=sigma, delta=float(dp.delta), clip_norm=float(dp.clip_norm),
        accountant=dp.accountant, target_epsilon=float(dp.epsilon), planned_steps=schedule.num_steps,
    )
    planned = ledger.epsilon(schedule.num_steps)
    if planned > dp.epsilon * (1 + 1e-9):
        logging.warning("The given noise_multiplier %.4f spends epsilon %.4f > target %.4f over %d steps.",
                        sigma, planned, dp.epsilon, schedule.num_steps)
    return ledger


def build_model(config: ml_collections.ConfigDict) -> DDPMpp:
    spec = image_spec(config)
    m = config.model
    return DDPMpp(
        image_size=spec.image_size, in_channels=spec.channels, num_classes=spec.num_classes,
        nf=m.nf, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
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


def init_variables(model: DDPMpp, seed: int) -> dict:
    """Initial variables from an integer seed ('rbg' keys: XLA:CPU compiles them ~4x faster)."""
    spec_shape = (1, model.image_size, model.image_size, model.in_channels)
    labels = None if model.num_classes is None else jnp.zeros((1,), jnp.int32)
    key = jax.random.key(seed, impl="rbg")
    return jax.jit(lambda k: model.init(k, jnp.zeros(spec_shape), jnp.zeros((1,)), labels))(key)


def per_example_loss(config: ml_collections.ConfigDict, model: DDPMpp):
    return make_per_example_loss(
        model_apply_fn(model),
        get_parameterisation(config.diffusion.parameterisation),
        config.diffusion.noise_multiplicity,
        image_spec(config).num_classes,
        config.diffusion.label_dropout,
    )


def host_examples(data: Dataset, indices: np.ndarray, conditional: bool) -> dict:
    """Rows `indices` as model inputs: {'image': float32 [-1, 1] (B,H,W,C), 'label': int32 (B,)}."""
    labels = data.labels[indices] if conditional else np.zeros(len(indices), np.int32)
    return {"image": to_model_range(data.images[indices]), "label": np.asarray(labels, np.int32)}
