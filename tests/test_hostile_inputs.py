"""Hostile inputs: invalid, extreme and wrong-typed config values, bad data, bad command lines.

Every user error must be a TypeError/ValueError (DataError is a ValueError) naming the field,
raised BEFORE any compute: `experiment.build_model` (the first step that builds a network) is
patched to fail the test if it is reached. Through `python -m dpdm_jax.main` a user error ends
with exit status 2 and a one-line `error: ...`, never a traceback.

Data-format errors (corrupt IDX/CIFAR/ImageNet/CelebA files, truncated gzip, float or NaN pixels
refused by `Dataset`, labels out of range, empty files) are tested file by file in test_data.py;
here they are driven through a training run.
"""
import math
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs import test_tiny
from dpdm_jax import experiment, train
from dpdm_jax.data import DataError, Dataset
from dpdm_jax.diffusion import PARAMETERISATIONS, SAMPLERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INF = math.inf


class ReachedCompute(Exception):
    """Not a ValueError/TypeError: reaching the model means validation let a bad value through."""


@pytest.fixture
def no_compute(monkeypatch):
    def build_model(config):
        raise ReachedCompute("experiment.build_model was reached")

    monkeypatch.setattr(experiment, "build_model", build_model)
    monkeypatch.setenv("DPDM_DATA_NO_FETCH", "1")


def loose_config(**values):
    """test_tiny as a ConfigDict WITHOUT type safety, so any value can be planted (as from a dict or
    a hand-built config; ml_collections' type-safe configs reject most wrong types on assignment)."""
    config = ml_collections.ConfigDict(test_tiny.get_config().to_dict(), type_safe=False)
    config.training.sample_every = -1
    for path, value in values.items():
        node, *keys = [config] + path.split(".")
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]  # a fresh field takes the value as it is (no casting, e.g. of False to 0.0)
        node[keys[-1]] = value
    return config


def run_expecting_error(config, workdir, field):
    """train.train must fail with a TypeError/ValueError naming `field`, before any compute."""
    with pytest.raises((TypeError, ValueError)) as e:
        train.train(config, workdir)
    assert field in str(e.value), f"{field!r} not named in: {e.value}"
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    return e.value


# ------------------------------------------------------------------ config values (hypothesis)

# Values of the wrong type for any field (None, text, containers, and bool where a number is due).
WRONG_TYPES = st.one_of(st.none(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text("abc", min_size=1, max_size=2), st.integers(), max_size=1))
NON_FINITE = st.sampled_from([math.nan, INF, -INF])


def bad_real(lo, hi, lo_open=False, hi_open=False):
    """Anything that is not a finite real number in the interval."""
    out = [WRONG_TYPES, st.booleans(), NON_FINITE]
    if lo > -INF:
        out.append(st.floats(max_value=lo, exclude_max=not lo_open, allow_nan=False))
        out.append(st.integers(max_value=math.ceil(lo) - 1))
    if hi < INF:
        out.append(st.floats(min_value=hi, exclude_min=not hi_open, allow_nan=False))
    return st.one_of(*out)


def bad_int(minimum=None):
    """Anything that is not an integer >= minimum (floats too, even 8.0)."""
    out = [WRONG_TYPES, st.booleans(), st.floats()]
    if minimum is not None:
        out.append(st.integers(max_value=minimum - 1))
    return st.one_of(*out)


def bad_choice(choices):
    return st.one_of(WRONG_TYPES.filter(lambda v: v not in choices), st.integers(), st.floats(allow_nan=False),
                     st.text(max_size=12).filter(lambda v: v not in choices))


BAD_BOOL = st.one_of(st.none(), st.integers(), st.text(max_size=3), st.floats(allow_nan=False))

# field -> strategy of invalid values; the error message must name the field's last component.
HOSTILE = {
    "dp.epsilon": bad_real(0, INF, lo_open=True),
    "dp.delta": bad_real(0, 1, lo_open=True, hi_open=True),
    "dp.clip_norm": bad_real(0, INF, lo_open=True),
    "dp.batch_size": bad_int(1),
    "dp.epochs": bad_real(0, INF, lo_open=True),
    "dp.accountant": bad_choice(("rdp", "pld")),
    "dp.noise_multiplier": bad_real(-INF, INF),
    "dp.allow_delta_above_1_over_n": BAD_BOOL,
    "diffusion.noise_multiplicity": bad_int(1),
    "diffusion.label_dropout": bad_real(0, 1, hi_open=True),
    "diffusion.parameterisation": bad_choice(PARAMETERISATIONS),
    # The test process has 8 devices: chunks must be multiples of 8, and 8 / 8 = 1 per device.
    "training.chunk_size": st.one_of(bad_int(1), st.integers(1, 10**6).filter(lambda v: v % 8)),
    "training.microbatch_size": st.one_of(bad_int(0), st.integers(min_value=2)),
    "training.log_every": bad_int(1),
    "training.checkpoint_every": bad_int(1),
    "training.keep_checkpoints": bad_int(1),
    "training.max_steps": bad_int(),
    "data.name": bad_choice(experiment.DATASET_NAMES),
    "data.conditional": BAD_BOOL,
    "data.max_examples": bad_int(0),
    "data.synthetic_size": bad_int(1),
    "data.synthetic_image_size": bad_int(1),
    "model.nf": bad_int(1),
    "model.dropout": st.one_of(bad_real(-INF, INF), st.floats(0.001, 1.0)),
    "optim.learning_rate": bad_real(0, INF, lo_open=True),
    "optim.b2": bad_real(0, 1, hi_open=True),
    "optim.ema_max_decay": bad_real(0, 1),
    "sampling.sampler": bad_choice(SAMPLERS),
    "sampling.num_steps": bad_int(1),
    "sampling.guidance_weight": bad_real(-INF, INF),
    "sampling.batch_size": bad_int(1),
    "seed": st.one_of(bad_int(-1), st.integers(min_value=2**62)),
}


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hostile_config_values_fail_before_compute(no_compute, tmp_path, data):
    field = data.draw(st.sampled_from(sorted(HOSTILE)), label="field")
    value = data.draw(HOSTILE[field], label="value")
    run_expecting_error(loose_config(**{field: value}), str(tmp_path), field.split(".")[-1])


@settings(max_examples=100, deadline=None)
@given(epsilon=st.floats(1e-6, 1e6), delta=st.floats(1e-300, 0.0156), clip=st.floats(1e-30, 1e30),
       batch=st.integers(1, 10**9), epochs=st.floats(1e-9, 1e6), k=st.integers(1, 10**6),
       label_dropout=st.floats(0, 1, exclude_max=True), lr=st.floats(1e-12, 1e3),
       sigma=st.floats(-1e9, 1e9), chunk=st.integers(1, 1000), log_every=st.integers(1, 10**9))
def test_valid_extremes_pass_validation(epsilon, delta, clip, batch, epochs, k, label_dropout, lr, sigma, chunk,
                                        log_every):
    """No false alarms: in-range values, however extreme, pass validate_config (type-safe config)."""
    config = test_tiny.get_config()
    config.dp.epsilon, config.dp.delta, config.dp.clip_norm = epsilon, delta, clip
    config.dp.batch_size, config.dp.epochs, config.dp.noise_multiplier = batch, epochs, sigma
    config.diffusion.noise_multiplicity, config.diffusion.label_dropout = k, label_dropout
    config.optim.learning_rate, config.training.chunk_size, config.training.log_every = lr, 8 * chunk, log_every
    experiment.validate_config(config)
    schedule = experiment.privacy_schedule(config, 64)
    assert 0 < schedule.sampling_rate <= 1 and schedule.num_steps >= 1


@pytest.mark.parametrize("overrides", [
    {"dp.epsilon": 1e6}, {"dp.epsilon": 1e-4}, {"dp.delta": 1e-300}, {"dp.batch_size": 1},
    {"dp.batch_size": 10**9}, {"dp.epochs": 1e-9}, {"dp.epochs": 1e6}, {"dp.clip_norm": 1e-30},
    {"dp.clip_norm": 1e30}, {"dp.noise_multiplier": 1e9},
])
def test_valid_extremes_give_a_ledger(overrides):
    """Extreme but valid privacy settings calibrate (RDP) to a usable ledger, or fail clearly.

    Not covered: the PLD accountant, whose calibration is slow for large epsilon (minutes for
    epsilon >= 60 at q = 0.25, T = 4 on a shared 2-core CPU).
    """
    config = loose_config(**overrides)
    experiment.validate_config(config)
    schedule = experiment.privacy_schedule(config, 64)
    ledger = experiment.make_ledger(config, schedule)
    assert ledger.noise_multiplier >= 0 and math.isfinite(ledger.noise_multiplier)
    epsilon = ledger.epsilon(schedule.num_steps)
    if config.dp.noise_multiplier < 0:  # calibrated: within the target
        assert epsilon <= config.dp.epsilon * (1 + 1e-9)
    elif config.dp.noise_multiplier == 0:  # no noise: no privacy, and the ledger says so
        assert epsilon == INF


@pytest.mark.parametrize("field, value, match", [
    ("dp.delta", 0.5, "1/N"),  # needs N: checked in make_ledger, still before compute
    ("data.conditional", True, "no class labels"),  # synthetic_num_classes = 0 below
    ("model.ch_mult", (1, 2, 2, 2, 2), "divisible"),  # 8x8 images cannot be halved four times
    ("model.ch_mult", (1, 0), "ch_mult"),
    ("model.attn_resolutions", "4", "attn_resolutions"),
    ("sampling.labels", "7", "sampling.labels"),  # test_tiny has 3 classes
    ("training.fid_every", 5, "fid_num_samples"),  # with fid_num_samples = 1 below
])
def test_inconsistent_configs_fail_before_compute(no_compute, tmp_path, field, value, match):
    extra = {"data.synthetic_num_classes": 0} if field == "data.conditional" else {}
    if field == "training.fid_every":
        extra = {"training.fid_num_samples": 1}
    run_expecting_error(loose_config(**{field: value}, **extra), str(tmp_path), match)


def test_every_shipped_config_passes_validation():
    import glob
    import importlib

    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py")))
    for name in (n for n in names if n != "__init__"):
        experiment.validate_config(importlib.import_module(f"configs.{name}").get_config())


# ------------------------------------------------------------------- data through a training run

from helpers import write_idx  # noqa: E402  (the one IDX writer)


def mnist_config(data_dir):
    return loose_config(**{"data.name": "mnist", "data.data_dir": str(data_dir), "model.attn_resolutions": (7,),
                           "data.fetch": False, "data.tfds_dir": ""})


@pytest.mark.parametrize("case, match", [
    ("labels_out_of_range", "out of range"), ("empty", "no images"), ("count_mismatch", "labels"),
    ("missing", "not found"),
])
def test_bad_training_data_fails_before_compute(no_compute, monkeypatch, tmp_path, case, match):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds"))
    d = tmp_path / "data" / "mnist"
    n = 0 if case == "empty" else 32
    labels = np.arange(n) % 10
    if case == "labels_out_of_range":
        labels[5] = 10
    if case != "missing":
        write_idx(str(d / "train-images-idx3-ubyte"), np.zeros((n, 28, 28)))
        write_idx(str(d / "train-labels-idx1-ubyte"), labels[:-1] if case == "count_mismatch" else labels)
    error = run_expecting_error(mnist_config(tmp_path / "data"), str(tmp_path / "run"), match)
    assert isinstance(error, DataError)


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from([np.uint8, np.int8, np.int32, np.float16, np.float32, np.float64, np.bool_]),
       shape=st.lists(st.integers(0, 3), min_size=1, max_size=5), special=st.sampled_from([0.0, math.nan, INF]),
       num_classes=st.one_of(st.none(), st.integers(-1, 4)), label_shift=st.integers(-2, 2))
def test_any_array_is_a_dataset_or_a_data_error(dtype, shape, special, num_classes, label_shift):
    """Arbitrary arrays (float with NaN/Inf, wrong rank, empty) and labels: a valid Dataset or DataError."""
    images = np.zeros(shape, dtype)
    if images.size and np.issubdtype(dtype, np.floating):
        images.flat[0] = special
    labels = None if num_classes is None else np.arange(shape[0]) % max(num_classes, 1) + label_shift
    try:
        ds = Dataset(images, labels, num_classes, "hostile")
    except DataError:
        return
    assert ds.images.dtype == np.uint8 and ds.images.ndim == 4 and min(ds.images.shape) > 0
    if ds.labels is not None:
        assert ds.labels.min() >= 0 and ds.labels.max() < ds.num_classes


# ------------------------------------------------------------------------ the command line

def test_main_reports_user_errors_in_one_line(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "DPDM_DATA_NO_FETCH": "1"}
    base = [sys.executable, "-m", "dpdm_jax.main", f"--workdir={tmp_path / 'run'}"]
    tiny = "--config=configs/test_tiny.py"
    cases = {  # arguments -> what the error line must say
        (tiny, "--config.dp.epsilon=-1"): "dp.epsilon",
        (tiny, "--config.dp.epochs=inf"): "dp.epochs",
        (tiny, "--config.data.name=nope"): "data.name",
        (tiny, "--config.training.checkpoint_every=0"): "training.checkpoint_every",
        (tiny, "--config.no_such_field=1"): "no_such_field",
        ("--config=configs/no_such_config.py",): "no_such_config.py",
        (tiny, "--mode=sample"): "No checkpoint",
    }
    procs = {args: subprocess.Popen(base + list(args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for args in cases}
    for args, expected in cases.items():
        _, stderr = procs[args].communicate(timeout=600)
        assert procs[args].returncode == 2, (args, stderr[-3000:])
        assert "Traceback" not in stderr, (args, stderr[-3000:])
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and expected in last, (args, last)
    # absl rejects a value of the wrong type for a typed field itself, also in one line.
    out = subprocess.run(base + [tiny, "--config.dp.batch_size=1.5"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "FATAL Flags parsing error: flag --config.dp.batch_size=1.5" in out.stderr


def test_zero_noise_multiplier_is_refused_before_compute():
    """sigma = 0 spends infinite epsilon: refused (was: a ledger reporting inf), naming the fix."""
    config = loose_config(**{"dp.noise_multiplier": 0.0})
    experiment.validate_config(config)
    with pytest.raises(ValueError, match="epsilon=inf .* dp.epsilon=10.*dp.enabled=False"):
        experiment.make_ledger(config, experiment.privacy_schedule(config, 64))


def test_a_sampler_setting_its_sampler_refuses_fails_before_training(no_compute, tmp_path):
    """sampling.num_steps=1 passes the type check but no sampler's time grid takes it: the config check
    asks the sampler (diffusion.get_sampler), so the run fails before any compute, not at the first grid."""
    for sampler in ("ddim", "ddim_stochastic", "edm"):
        run_expecting_error(loose_config(**{"sampling.sampler": sampler, "sampling.num_steps": 1}),
                            str(tmp_path / sampler), "sampling.num_steps")


def test_choice_lists_come_from_the_registries():
    from dpdm_jax.diffusion import PARAMETERISATIONS, SAMPLERS, parameterisations, samplers
    from dpdm_jax.dp import ACCOUNTANTS
    from dpdm_jax.models import CONV_IMPLS

    assert set(PARAMETERISATIONS) == set(parameterisations._PARAMETERISATIONS)
    assert set(SAMPLERS) == set(samplers._SAMPLERS)
    for field, names in (("diffusion.parameterisation", PARAMETERISATIONS), ("sampling.sampler", SAMPLERS),
                         ("dp.accountant", ACCOUNTANTS), ("model.conv_impl", CONV_IMPLS)):
        with pytest.raises(ValueError, match=field) as e:
            experiment.validate_config(loose_config(**{field: "no_such_name"}))
        assert all(repr(n) in str(e.value) for n in names), (field, str(e.value))
