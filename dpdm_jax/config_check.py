"""The config's checks that need no data and no compute: fail before anything expensive starts.

`validate_config(config)` checks every field the modes read (type and range, errors naming the
field); `image_spec(config)` is what the data section says the images are. `experiment` builds the
run's objects from a config that passed these checks.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from dpdm_jax.data import SPECS, folder_class_names, inspect_npz, npz_target
from dpdm_jax.diffusion import PARAMETERISATIONS, SAMPLERS, get_sampler, resolve_labels
from dpdm_jax.dp import ACCOUNTANTS
from dpdm_jax.evaluation.classifiers import KINDS as CLASSIFIER_KINDS
from dpdm_jax.models import onednn
from dpdm_jax.models.layers import CONV_IMPLS
from dpdm_jax.validation import require_bool as _bool
from dpdm_jax.validation import require_choice as _choice
from dpdm_jax.validation import require_int as _int
from dpdm_jax.validation import require_real as _real
from dpdm_jax.validation import require_str as _str


# image size, channels, number of classes (None: the dataset has no labels we use), read from the
# one dataset table (data.SPECS); synthetic, folder and npz take theirs from data.* and the files.
DATASET_INFO = {name: (s.image_shape[0], s.image_shape[2], s.num_classes) for name, s in SPECS.items()}
USER_DATASETS = ("folder", "npz")  # your own images: size, channels, classes from data.* and the files
DATASET_NAMES = tuple(sorted(DATASET_INFO)) + ("synthetic",) + USER_DATASETS


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    image_size: int
    channels: int
    num_classes: int | None  # None: unconditional model

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)



def image_spec(config: ml_collections.ConfigDict) -> ImageSpec:
    name = config.data.name
    if name == "synthetic":
        size, channels, classes = (config.data.synthetic_image_size, config.data.synthetic_channels,
                                   config.data.synthetic_num_classes)
    elif name in DATASET_INFO:
        size, channels, classes = DATASET_INFO[name]
    elif name == "folder":  # classes: the subfolders (listed, not decoded)
        size, channels = config.data.image_size, config.data.channels
        class_names = folder_class_names(config.data.path)
        classes = None if class_names is None else len(class_names)
    elif name == "npz":  # shape and classes: the file's header and labels (images not read)
        summary = inspect_npz(config.data.path)
        size, channels = npz_target(summary, config.data.image_size, config.data.channels)
        classes = None if summary.class_names is None else len(summary.class_names)
    else:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {list(DATASET_NAMES)}")
    if config.data.conditional and classes is None:
        raise ValueError(f"data.conditional=True but {name} has no class labels; set data.conditional=False")
    return ImageSpec(size, channels, classes if config.data.conditional else None)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks that need no data and no compute: fail before anything expensive starts.

    Every field the trainer reads is checked for type and range; errors are TypeError/ValueError
    naming the field. (The data-dependent checks, delta < 1/N, run in make_ledger.)
    """
    _int("seed", config.seed, -1)
    if config.seed >= 2**62:
        raise ValueError(f"seed must be -1 (secret) or in [0, 2**62), got {config.seed}")
    d = config.data
    if not isinstance(d.name, str) or d.name not in DATASET_NAMES:
        raise ValueError(f"Unknown dataset {d.name!r} (data.name); choose one of {list(DATASET_NAMES)}")
    _bool("data.conditional", d.conditional)
    _int("data.max_examples", d.max_examples, 0)
    _str("data.data_dir", d.data_dir)
    _bool("data.fetch", d.fetch)
    _str("data.tfds_dir", d.tfds_dir)
    if d.name == "synthetic":
        for field in ("synthetic_size", "synthetic_image_size", "synthetic_channels"):
            _int(f"data.{field}", d[field], 1)
        if _int("data.synthetic_num_classes", d.synthetic_num_classes, 0) == 0 and d.conditional:
            raise ValueError("data.conditional=True but data.synthetic_num_classes=0 (no class labels); "
                             "set data.conditional=False")
    if d.name in USER_DATASETS:
        _validate_user_data(d)
    spec = image_spec(config)

    m = config.model
    _int("model.nf", m.nf, 1)
    _int("model.num_res_blocks", m.num_res_blocks, 1)
    if not isinstance(m.ch_mult, (tuple, list)) or not m.ch_mult:
        raise TypeError(f"model.ch_mult must be a non-empty tuple of integers, got {m.ch_mult!r}")
    for i, mult in enumerate(m.ch_mult):
        _int(f"model.ch_mult[{i}]", mult, 1)
    if not isinstance(m.attn_resolutions, (tuple, list)):
        raise TypeError(f"model.attn_resolutions must be a tuple of integers, got {m.attn_resolutions!r}")
    for i, res in enumerate(m.attn_resolutions):
        _int(f"model.attn_resolutions[{i}]", res, 1)
    if spec.image_size % 2 ** (len(m.ch_mult) - 1):
        raise ValueError(f"image size {spec.image_size} must be divisible by 2**(len(model.ch_mult) - 1) = "
                         f"{2 ** (len(m.ch_mult) - 1)} (model.ch_mult={tuple(m.ch_mult)})")
    if _real("model.dropout", m.dropout) != 0:
        raise ValueError("model.dropout must be 0 (DPDM trains without dropout)")
    _choice("model.conv_impl", m.conv_impl, CONV_IMPLS)
    if m.conv_impl == "onednn":
        _check_onednn()

    _choice("diffusion.parameterisation", config.diffusion.parameterisation, PARAMETERISATIONS)
    _int("diffusion.noise_multiplicity K", config.diffusion.noise_multiplicity, 1)
    _real("diffusion.label_dropout", config.diffusion.label_dropout, 0, 1, hi_open=True)
    _real("diffusion.edm_p_mean", config.diffusion.edm_p_mean)
    _real("diffusion.edm_p_std", config.diffusion.edm_p_std, 0, lo_open=True)

    dp = config.dp
    _real("dp.epsilon", dp.epsilon, 0, lo_open=True)
    _real("dp.delta", dp.delta, 0, 1, lo_open=True, hi_open=True)
    _real("dp.clip_norm", dp.clip_norm, 0, lo_open=True)
    _int("dp.batch_size", dp.batch_size, 1)
    _real("dp.epochs", dp.epochs, 0, lo_open=True)
    _choice("dp.accountant", dp.accountant, ACCOUNTANTS)
    _real("dp.noise_multiplier (< 0: calibrate from epsilon)", dp.noise_multiplier)
    _bool("dp.allow_delta_above_1_over_n", dp.allow_delta_above_1_over_n)
    _bool("dp.enabled (False: the non-private baseline, NO PRIVACY)", dp.enabled)

    o = config.optim
    _real("optim.learning_rate", o.learning_rate, 0, lo_open=True)
    _real("optim.b1", o.b1, 0, 1, hi_open=True)
    _real("optim.b2", o.b2, 0, 1, hi_open=True)
    _real("optim.eps", o.eps, 0)
    _real("optim.ema_max_decay", o.ema_max_decay, 0, 1)

    t = config.training
    n_dev = jax.device_count()
    _int("training.chunk_size", t.chunk_size, 1)
    if t.chunk_size % n_dev:
        raise ValueError(f"training.chunk_size={t.chunk_size} must be a positive multiple of the "
                         f"device count {n_dev}")
    _int("training.microbatch_size", t.microbatch_size, 0)
    if t.microbatch_size and (t.chunk_size // n_dev) % t.microbatch_size:
        raise ValueError(f"training.microbatch_size={t.microbatch_size} must divide the per-device "
                         f"chunk {t.chunk_size // n_dev}")
    _int("training.max_steps", t.max_steps)
    _int("training.log_every", t.log_every, 1)
    _int("training.checkpoint_every", t.checkpoint_every, 1)
    _int("training.keep_checkpoints", t.keep_checkpoints, 1)
    if _int("training.sample_every", t.sample_every) >= 0:
        _int("training.num_grid_samples", t.num_grid_samples, 1)
    if _int("training.fid_every", t.fid_every) > 0:
        _int("training.fid_num_samples", t.fid_num_samples, 2)
    if _int("training.label_accuracy_every", t.label_accuracy_every) > 0:
        _int("training.label_accuracy_num_samples", t.label_accuracy_num_samples, 1)
        if spec.num_classes is None or config.data.name in USER_DATASETS:
            raise ValueError("training.label_accuracy_every > 0 needs a class-conditional model of a "
                             "built-in dataset (its real-data classifier labels the samples)")

    ev = config.eval
    _int("eval.num_samples", ev.num_samples, 2)
    _int("eval.fid_batch_size", ev.fid_batch_size, 1)
    _int("eval.fid_reference_images", ev.fid_reference_images, 0)
    _int("eval.classifier_epochs", ev.classifier_epochs, 1)
    if not isinstance(ev.classifiers, (tuple, list)):
        raise TypeError(f"eval.classifiers must be a tuple of names from {CLASSIFIER_KINDS}, got {ev.classifiers!r}")
    for i, kind in enumerate(ev.classifiers):
        _choice(f"eval.classifiers[{i}]", kind, CLASSIFIER_KINDS)
    _str("eval.inception_weights", ev.inception_weights)
    _str("eval.fid_stats_dir", ev.fid_stats_dir)
    _bool("eval.fid", ev.fid)
    _bool("eval.kid", ev.kid)
    _int("eval.kid_reference_images", ev.kid_reference_images, 2)
    _int("eval.kid_num_subsets", ev.kid_num_subsets, 2)
    _bool("eval.label_accuracy", ev.label_accuracy)
    _int("eval.label_classifier_epochs", ev.label_classifier_epochs, 1)

    validate_sampling(config.sampling, spec.num_classes)
    _int("export.step", config.export.step, -1)
    if not isinstance(config.export.dir, str):
        raise TypeError(f"export.dir must be a directory or '', got {config.export.dir!r}")


def validate_sampling(s: ml_collections.ConfigDict, num_classes: int | None) -> None:
    """The sampling.* fields, for a model with `num_classes` classes (None: unconditional).

    Shared by a run's config check and `--mode=sample` from a release (whose classes come from
    its model.json, not from the config's data section).
    """
    _choice("sampling.sampler", s.sampler, SAMPLERS)
    _int("sampling.num_steps", s.num_steps, 1)
    _real("sampling.guidance_weight", s.guidance_weight)
    _real("sampling.s_churn", s.s_churn, 0)
    _real("sampling.s_min", s.s_min, 0)
    _real("sampling.s_max", s.s_max, 0)
    _real("sampling.s_noise", s.s_noise, 0)
    _int("sampling.num_samples", s.num_samples, 1)
    _int("sampling.batch_size", s.batch_size, 1)
    _int("sampling.checkpoint_step", s.checkpoint_step, -1)
    _bool("sampling.write_png", s.write_png)
    if not isinstance(s.release, str):
        raise TypeError(f"sampling.release must be a release directory or '', got {s.release!r}")
    if _int("sampling.seed", s.seed, -1) >= 2**62:
        raise ValueError(f"sampling.seed must be -1 (fresh) or in [0, 2**62), got {s.seed}")
    resolve_labels(s.labels, 1, num_classes)  # the reading sample and eval use
    name, options = sampler_options(s)
    try:  # the sampler's own check (e.g. its time grid needs num_steps >= 2), before any training
        get_sampler(name, **options)
    except ValueError as e:
        raise ValueError(f"sampling.{e}" if str(e).startswith("num_steps") else f"sampling: {e}") from None


def sampler_options(s: ml_collections.ConfigDict) -> tuple[str, dict]:
    """The image sampler's name and keyword options from the sampling.* section, as
    diffusion.get_sampler takes them."""
    options = {"num_steps": s.num_steps}
    if s.sampler == "edm":
        options.update(s_churn=s.s_churn, s_min=s.s_min, s_max=s.s_max, s_noise=s.s_noise)
    return s.sampler, options


def _validate_user_data(d: ml_collections.ConfigDict) -> None:
    """data.path / image_size / channels for folder and npz (the files are checked by image_spec)."""
    if not isinstance(d.path, str) or not d.path:
        raise ValueError(f"data.path must name the {'image folder' if d.name == 'folder' else '.npz file'} "
                         f"for data.name={d.name!r}, got {d.path!r}")
    if not os.path.exists(os.path.expanduser(d.path)):
        raise ValueError(f"data.path={d.path!r} does not exist")
    if d.name == "folder":  # its images may differ in size and mode: the target must be given
        _int("data.image_size", d.image_size, 1)
        allowed = (1, 3)
    else:  # npz: 0 keeps the stored size / channels
        _int("data.image_size", d.image_size, 0)
        allowed = (0, 1, 3)
    if _int("data.channels", d.channels) not in allowed:
        raise ValueError(f"data.channels must be one of {allowed} for data.name={d.name!r} "
                         f"(1: grayscale, 3: RGB, 0: as stored), got {d.channels}")


def _check_onednn():
    """conv_impl='onednn' needs the CPU backend and kernels that build here (g++, libdnnl-dev).

    The kernels are built on the first call (seconds, once per machine), only when asked for."""
    if jax.default_backend() != "cpu":
        raise ValueError(f"model.conv_impl='onednn' runs on the CPU backend only, not {jax.default_backend()!r}; "
                         "use 'auto'")
    reason = onednn.unavailable_reason()
    if reason is not None:
        raise ValueError(f"model.conv_impl='onednn' cannot run here: {reason}")
