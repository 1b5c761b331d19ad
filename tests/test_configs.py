"""Every shipped config builds and runs a DP step (model and data shrunk, nothing else changed)."""
import importlib
import json
import os
import re

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import test_tiny
from dpdm_jax import experiment, train
from dpdm_jax.config_check import validate_config

SHIPPED = [
    ("mnist", "eps0.2"), ("mnist", "eps1"), ("mnist", "eps10"),
    ("fashion_mnist", "eps0.2"), ("fashion_mnist", "eps1"), ("fashion_mnist", "eps10"),
    ("cifar10", "eps10"), ("celeba32", "eps1"), ("celeba32", "eps10"), ("celeba64", "eps10"),
    ("imagenet32", "eps10"), ("quickstart", ""), ("quickstart", "k1"), ("quickstart", "k2"), ("quickstart", "v294"), ("mnist_cpu", ""),
]
CPU_PRESETS = ("quickstart", "mnist_cpu")  # deliberately not the paper's network or recipe


def load(name, preset):
    module = importlib.import_module(f"configs.{name}")
    return module.get_config(preset) if preset else module.get_config()


def shrink(config):
    """Same config, tiny network and a tiny synthetic dataset of the real data's shape."""
    spec = experiment.image_spec(config)
    config.data.name = "synthetic"
    config.data.synthetic_size = 8
    config.data.synthetic_image_size = spec.image_size
    config.data.synthetic_channels = spec.channels
    config.data.synthetic_num_classes = spec.num_classes or 0
    config.model.nf = 8
    config.model.num_res_blocks = 1
    config.training.chunk_size = 8
    config.training.microbatch_size = 0
    config.training.max_steps = 1
    config.training.sample_every = -1
    config.training.label_accuracy_every = 0
    config.seed = 0
    return config


# The paper's networks, built from the shipped configs (method.md section 3).
OFFICIAL_PARAMS = {"mnist": 1_753_345, "fashion_mnist": 1_753_345, "cifar10": 1_754_499, "celeba32": 1_804_451,
                   "celeba64": 1_999_907, "imagenet32": 1_836_483}
# One step per distinct program in the default suite; every config runs a step in the slow suite.
FAST = {("mnist", "eps0.2"), ("mnist", "eps1"), ("cifar10", "eps10"), ("celeba32", "eps10")}


@pytest.mark.parametrize("name, preset", SHIPPED)
def test_shipped_config_builds(name, preset):
    """As shipped: valid, calibrated within the target, and the paper's network."""
    import jax

    from dpdm_jax.models import count_params

    config = load(name, preset)
    experiment.validate_config(config)
    n = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000, "celeba32": 162770, "celeba64": 162770,
         "imagenet32": 1281167}[config.data.name]
    schedule = experiment.privacy_schedule(config, n)
    ledger = experiment.make_ledger(config, schedule)
    assert ledger.epsilon(schedule.num_steps) <= config.dp.epsilon
    if name not in CPU_PRESETS:
        model = experiment.build_model(config)
        shapes = jax.eval_shape(lambda: experiment.init_variables(model, jax.random.key(0)))
        assert count_params(shapes["params"]) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize(
    "name, preset",
    [pytest.param(n, p, marks=() if (n, p) in FAST else pytest.mark.slow) for n, p in SHIPPED],
)
def test_shipped_config_runs_a_step(tmp_path, name, preset):
    config = load(name, preset)
    # The paper's settings are what ships (method.md); the quickstart is deliberately not the paper's.
    assert config.dp.clip_norm == 1.0
    if name not in CPU_PRESETS:
        assert config.optim.learning_rate in (3e-4, 1e-3)
    if name in ("mnist", "fashion_mnist"):
        assert config.dp.epsilon == float(preset[3:])  # eps0.2 really is 0.2 (the official configs say 10)
        assert config.diffusion.parameterisation == ("v" if preset == "eps0.2" else "edm")
        assert config.diffusion.noise_multiplicity == 32
    state = train.train(shrink(config), str(tmp_path))
    assert int(state.step) == 1
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        record = json.loads(f.readline())
    assert np.isfinite(record["loss"]) and record["nonfinite_fraction"] == 0


@pytest.mark.parametrize("parameterisation", ["vp", "ve", "v", "edm"])
def test_each_parameterisation_trains_without_nan(tmp_path, parameterisation):
    config = test_tiny.get_config()
    config.diffusion.parameterisation = parameterisation
    config.training.max_steps = 3
    config.training.sample_every = 3
    state = train.train(config, str(tmp_path))
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 3
    assert all(np.isfinite(r["loss"]) and r["nonfinite_fraction"] == 0 for r in records)
    import jax

    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert os.path.exists(os.path.join(tmp_path, "samples", "grid_step3.png"))


@pytest.mark.parametrize(
    "key, value, match",
    [("dp.epsilon", 0.0, "epsilon"), ("dp.epsilon", -1.0, "epsilon"), ("dp.delta", 0.5, "1/N"),
     ("dp.clip_norm", 0.0, "clip_norm"), ("diffusion.noise_multiplicity", 0, "noise_multiplicity"),
     ("diffusion.parameterisation", "ddpm", "parameterisation"), ("sampling.sampler", "euler", "sampler"),
     ("training.chunk_size", 6, "multiple of the device count"), ("data.name", "svhn", "Unknown dataset"),
     ("model.dropout", 0.1, "dropout"), ("diffusion.label_dropout", 1.0, "label_dropout"),
     ("diffusion.edm_p_std", 0.0, "edm_p_std")],
)
def test_bad_configs_fail_before_compute(tmp_path, key, value, match):
    config = test_tiny.get_config()
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(ValueError, match=match):
        train.train(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints" / "1")


def test_edm_training_noise_law_comes_from_the_config():
    import jax

    config = test_tiny.get_config()
    config.diffusion.parameterisation = "edm"
    default = experiment.make_parameterisation(config)
    assert (default.p_mean, default.p_std) == (-1.2, 1.2)  # Karras et al.'s law, DPDM's default
    config.diffusion.edm_p_mean, config.diffusion.edm_p_std = 0.5, 0.25
    p = experiment.make_parameterisation(config)
    assert (p.p_mean, p.p_std) == (0.5, 0.25)
    assert experiment.image_sampling(config).parameterisation == p
    log_sigma = np.log(np.asarray(p.sample_sigma(jax.random.key(0), (4096,))))
    assert abs(log_sigma.mean() - 0.5) < 0.02 and abs(log_sigma.std() - 0.25) < 0.02
    config.diffusion.parameterisation = "v"  # the EDM fields do not touch other parameterisations
    assert experiment.make_parameterisation(config).name == "v"


def fidelity_study_runs():
    """(base config, {run name: its override flags}) as benchmarks/fidelity_study.sh declares them."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "fidelity_study.sh")
    with open(path) as f:
        text = f.read()
    base = re.search(r"^CONFIG=(\S+)", text, re.MULTILINE).group(1)
    edm = re.search(r'^EDM="([^"]*)"$', text, re.MULTILINE).group(1)
    runs = dict(re.findall(r'^\s+\[(\w+)\]="([^"]*)"$', text, re.MULTILINE))
    return base, {name: flags.replace("$EDM", edm).split() for name, flags in runs.items()}


def parse(argv):
    """The config main.py would run for this command line."""
    fv = flags.FlagValues()  # as main.py defines it; sys_argv: which overrides to define
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_quickstart_is_the_measured_run():
    """Each quickstart preset is the study run of benchmarks/fidelity_study.sh that docs/fidelity.md measured."""
    base, runs = fidelity_study_runs()
    # The shipped quickstart is the qs_k2_t150 study run, evaluated on 5000 samples (eval only).
    measured = parse(["main", f"--config={base}", *runs["qs_k2_t150"]])
    shipped = load("quickstart", "")
    assert shipped.eval.num_samples == 5000 and measured.eval.num_samples == 1000
    measured.eval.num_samples = 5000
    assert shipped.to_dict() == measured.to_dict()
    assert shipped.diffusion.noise_multiplicity == 2 and experiment.privacy_schedule(shipped, 60000).num_steps == 150
    # k1 (the quickstart of 2026-12-03) is the edm_hi_fast study run sampled with guidance 2.
    measured_k1 = parse(["main", f"--config={base}", *runs["edm_hi_fast"]])
    k1 = load("quickstart", "k1")
    assert k1.sampling.guidance_weight == 2.0 and measured_k1.sampling.guidance_weight == 3.0
    measured_k1.sampling.guidance_weight = 2.0  # sampling only: free for privacy, chosen after training
    assert k1.to_dict() == measured_k1.to_dict()
    # The k2 preset is the qs_k2_t170 study run, evaluated on 5000 samples.
    measured_k2 = parse(["main", f"--config={base}", *runs["qs_k2_t170"]])
    k2 = load("quickstart", "k2")
    measured_k2.eval.num_samples = 5000
    assert k2.to_dict() == measured_k2.to_dict()
    assert k2.training.chunk_size * 2 == k1.training.chunk_size  # 16 rows per call with K = 2 as with K = 1
    with pytest.raises(ValueError, match="Unknown quickstart preset"):
        load("quickstart", "v2")
    # The qs_* studies of sessions 7-9 are k1 (then the shipped quickstart) with one change each.
    for name, (section, key, value) in {"qs_eps1": ("dp", "epsilon", 1.0),
                                        "qs_fmnist": ("data", "name", "fashion_mnist"),
                                        "qs_fmnist_np": ("dp", "enabled", False),
                                        "qs_k2": ("diffusion", "noise_multiplicity", 2)}.items():
        study = parse(["main", f"--config={base}", *runs[name]]).to_dict()
        expected = load("quickstart", "k1").to_dict()
        expected[section][key] = value
        if name == "qs_fmnist_np":
            expected["data"]["name"] = "fashion_mnist"
        assert study == expected, name
    # mnist_cpu builds on k1 (its measured runs, sessions 4-9), not on the K = 2 default.
    assert load("mnist_cpu", "").diffusion.noise_multiplicity == 1


def test_fidelity_study_runs_parse_and_validate():
    """Every recorded command of docs/fidelity.md parses as main parses it and passes the config checks."""
    base, runs = fidelity_study_runs()
    assert base == "configs/quickstart.py:v294"  # the recorded runs are overrides of the old quickstart
    assert {"dp10", "v", "vp", "ve", "v1", "v_np", "v_fast", "v100", "v100_k4", "edm_hi", "edm_hi_fast"} <= set(runs)
    for name, overrides in runs.items():
        config = parse(["main", f"--config={base}", *overrides])
        validate_config(config)
        for flag in overrides:  # each override took effect (a misspelt key would have raised above)
            key, value = flag.removeprefix("--config.").split("=", 1)
            got = config
            for part in key.split("."):
                got = got[part]
            assert str(got) == value or float(got) == float(value), (name, flag, got)
