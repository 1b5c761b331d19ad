"""The run seed is secret, and every reported guarantee is honest (issue 10 items 2-5)."""
import glob
import json
import os

import jax
import numpy as np
import pytest

from dpdm_jax import experiment, train
from dpdm_jax.checkpoint import Checkpointer
from dpdm_jax.dp import DPPlan, run_keys
from helpers import tiny_config




def test_init_depends_on_every_seed_bit_not_only_the_low_32():
    """Seeds equal in their low 32 bits give different initial parameters (public in the threat model)."""
    model = experiment.build_model(tiny_config())
    s = 123456789
    inits = [jax.tree.leaves(experiment.init_variables(model, run_keys(seed)[2])) for seed in
             (s, s + 2**32, s + 2**61)]
    for other in inits[1:]:
        assert any(not np.array_equal(a, b) for a, b in zip(inits[0], other))
    again = jax.tree.leaves(experiment.init_variables(model, run_keys(s)[2]))
    assert all(np.array_equal(a, b) for a, b in zip(inits[0], again))
    with pytest.raises(TypeError, match="PRNG key"):  # an integer seed (low 32 bits only) is refused
        experiment.init_variables(model, s)


def test_explicit_noise_multiplier_that_overspends_is_refused_before_compute():
    config = tiny_config(**{"dp.noise_multiplier": 0.3})
    schedule = experiment.privacy_schedule(config, 64)
    with pytest.raises(ValueError) as e:
        experiment.make_plan(config, schedule)
    message = str(e.value)
    planned = DPPlan(64, schedule.sampling_rate, schedule.num_steps, 0.3, 1e-3, 1.0).epsilon()
    assert f"{planned:.4g}" in message and "dp.epsilon=10" in message and "noise_multiplier=-1" in message
    # Within the target it is accepted, and extending dp.epochs past the target is refused the same way.
    config = tiny_config(**{"dp.noise_multiplier": 2.0})
    assert experiment.make_plan(config, experiment.privacy_schedule(config, 64)).epsilon() <= 10
    config.dp.epochs = 1000.0
    with pytest.raises(ValueError, match="more than the target"):
        experiment.make_plan(config, experiment.privacy_schedule(config, 64))


def _outputs(workdir):
    """Every file a run writes except its (private) checkpoints, as bytes."""
    files = [f for f in glob.glob(os.path.join(workdir, "**"), recursive=True)
             if os.path.isfile(f) and os.sep + "checkpoints" + os.sep not in f]
    return {f: open(f, "rb").read() for f in files}


def test_default_seed_run_has_a_guarantee_and_its_seed_appears_nowhere(tmp_path, capfd):
    workdir = str(tmp_path / "run")
    config = tiny_config(**{"seed": -1, "training.max_steps": 2, "training.sample_every": 2})
    train.train(config, workdir)
    out, err = capfd.readouterr()
    assert f"Privacy guarantee of {workdir}: epsilon=" in out and "NO guarantee" not in out + err
    meta = Checkpointer(os.path.join(workdir, "checkpoints")).restore_metadata(2)
    seed = int(meta["seed"])
    assert meta["seed_secret"] is True and meta["ledger"]["seed_secret"] is True
    words = np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
    needles = [str(seed).encode(), hex(seed).encode(), np.int64(seed).tobytes(), words.tobytes(),
               words[::-1].tobytes()]
    texts = {"stdout+stderr": (out + err).encode(), **_outputs(workdir)}
    assert any(f.endswith(".png") for f in texts) and any("tensorboard" in f for f in texts)
    plan = experiment.make_plan(config, experiment.privacy_schedule(config, 64))
    for obj in (plan, plan.sampler(8), plan.ledger(True), plan.step(lambda p, x, k: 0.0, train.make_optimizer(config))):
        texts[repr(obj)] = repr(obj).encode()
    for name, blob in texts.items():
        for needle in needles:
            assert needle not in blob, f"the seed appears in {name}"
    ledger = json.load(open(os.path.join(workdir, "privacy_ledger.json")))
    assert ledger["seed_secret"] is True and ledger["guarantee"].startswith("(")


def test_public_seed_run_says_no_guarantee_and_cannot_resume_as_secret(tmp_path, capfd):
    workdir = str(tmp_path / "run")
    train.train(tiny_config(**{"training.max_steps": 1}), workdir)  # test_tiny: seed=0, public
    out, _ = capfd.readouterr()
    assert "NO guarantee: the seed is public" in out and "Privacy guarantee" not in out
    ledger = json.load(open(os.path.join(workdir, "privacy_ledger.json")))
    assert ledger["seed_secret"] is False and ledger["guarantee"].startswith("NO guarantee: the seed is public")
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert all(r["privacy"].startswith("NO guarantee: the seed is public") for r in records)
    assert Checkpointer(os.path.join(workdir, "checkpoints")).restore_metadata(1)["seed_secret"] is False
    # Resuming under the default seed=-1 is refused (it would silently keep the public seed) ...
    with pytest.raises(ValueError, match="public seed 0"):
        train.train(tiny_config(**{"seed": -1, "training.max_steps": 2}), workdir)
    assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [1]
    # ... unless the config names the public seed explicitly, and then it still says NO guarantee.
    train.train(tiny_config(**{"training.max_steps": 2}), workdir)
    out, _ = capfd.readouterr()
    assert "NO guarantee: the seed is public" in out and "after 2/4 steps" in out


def test_non_private_baseline_says_no_privacy_everywhere(tmp_path, capfd):
    workdir = str(tmp_path / "run")
    state = train.train(tiny_config(**{"dp.enabled": False, "seed": -1, "training.max_steps": 2}), workdir)
    out, err = capfd.readouterr()
    assert "Privacy guarantee" not in out + err and "NO PRIVACY" in out
    ledger = json.load(open(os.path.join(workdir, "privacy_ledger.json")))
    assert ledger["private"] is False and ledger["guarantee"].startswith("NO PRIVACY")
    assert ledger["noise_multiplier"] == 0 and ledger["clip_norm"] is None
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert all(r["privacy"].startswith("NO PRIVACY") and "epsilon" not in r for r in records)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    # A private config cannot resume it (the privacy parameters differ).
    with pytest.raises(ValueError, match="Refusing to resume"):
        train.train(tiny_config(**{"seed": -1, "training.max_steps": 3}), workdir)
