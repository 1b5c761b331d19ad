"""Training as a product: main entry point, checkpoints, exact resume, refused resume."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpdm_jax import main, train
from dpdm_jax.checkpoint import Checkpointer
from helpers import assert_trees_equal, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def params_of(state):
    return jax.device_get((state.params, state.ema_params, state.opt_state))


def test_main_train_then_sample(tmp_path):
    """End to end through `python -m dpdm_jax.main`: train a few steps, then sample."""
    workdir = str(tmp_path / "run")
    env = {**os.environ, "XLA_FLAGS": "", "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    base = [sys.executable, "-m", "dpdm_jax.main", "--config=configs/test_tiny.py", f"--workdir={workdir}",
            "--config.training.max_steps=3", "--config.training.sample_every=3"]
    out = subprocess.run(base + ["--mode=train"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    # Where tcmalloc is installed the command re-ran itself with it preloaded (speed only).
    allocator = main.tcmalloc_preload(env) or env.get("LD_PRELOAD") or "the C library's malloc"
    assert f"allocator: {allocator}" in out.stderr
    # test_tiny's seed is fixed, hence public: the summary line says NO guarantee, never "Privacy guarantee".
    assert "NO guarantee: the seed is public" in out.stdout and "after 3/4 steps" in out.stdout
    assert "Privacy guarantee" not in out.stdout
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and 0 < r["epsilon"] < 10 for r in records)
    assert records[-1]["epsilon"] > records[0]["epsilon"]
    assert os.path.exists(os.path.join(workdir, "samples", "grid_step3.png"))
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    ledger = json.load(open(os.path.join(workdir, "privacy_ledger.json")))
    assert ledger["steps"] == 3

    out = subprocess.run(base + ["--mode=sample", "--config.sampling.num_samples=5"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    samples = np.load(os.path.join(workdir, "samples", "samples_step3.npz"))
    assert samples["images"].shape == (5, 8, 8, 1) and samples["images"].dtype == np.uint8
    np.testing.assert_array_equal(samples["labels"], np.arange(5) % 3)  # balanced by default
    manifest = json.load(open(os.path.join(workdir, "samples", "samples_step3.json")))
    assert manifest["privacy"].startswith("NO guarantee: the seed is public") and not manifest["has_guarantee"]


def test_tcmalloc_preload_decision():
    """main re-runs itself with tcmalloc only if installed, nothing is preloaded and the user did not opt out."""
    libs = ("/no/such/libtcmalloc.so", "/found/libtcmalloc_minimal.so.4")
    exists = lambda path: path.startswith("/found/")
    assert main.tcmalloc_preload({}, libs, exists) == "/found/libtcmalloc_minimal.so.4"
    assert main.tcmalloc_preload({"DPDM_NO_TCMALLOC": "0"}, libs, exists) == "/found/libtcmalloc_minimal.so.4"
    assert main.tcmalloc_preload({"DPDM_NO_TCMALLOC": "1"}, libs, exists) is None
    assert main.tcmalloc_preload({"LD_PRELOAD": "/my/jemalloc.so"}, libs, exists) is None  # the user's choice wins
    assert main.tcmalloc_preload({}, libs[:1], exists) is None  # not installed: run as is


def test_checkpoint_roundtrip(tmp_path):
    state = train.train(tiny_config(**{"training.max_steps": 2}), str(tmp_path))
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.all_steps() == [2]
    restored, meta = ckpt.restore(2, state)
    assert_trees_equal(params_of(restored), params_of(state))
    assert meta["ledger"]["steps"] == 2 == int(restored.step)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    full = train.train(tiny_config(**{"training.max_steps": 4}), str(tmp_path / "full"))
    part = str(tmp_path / "part")
    train.train(tiny_config(**{"training.max_steps": 2}), part)  # "killed" after step 2
    resumed = train.train(tiny_config(**{"training.max_steps": 4}), part)
    assert int(resumed.step) == 4
    assert_trees_equal(params_of(resumed), params_of(full))  # bit-identical on CPU


@pytest.mark.parametrize(
    "change, match",
    [({"dp.epsilon": 5.0}, "noise_multiplier"), ({"dp.delta": 1e-4}, "delta"),
     ({"dp.clip_norm": 2.0}, "clip_norm"), ({"dp.batch_size": 8}, "sampling_rate"), ({"seed": 1}, "seed")],
)
def test_resume_refused_when_privacy_parameters_change(one_step_workdir, change, match):
    with pytest.raises(ValueError, match=match):
        train.train(tiny_config(**{"training.max_steps": 2, **change}), one_step_workdir)
    # Nothing ran: the checkpoint is untouched.
    assert Checkpointer(os.path.join(one_step_workdir, "checkpoints")).all_steps() == [1]


@pytest.fixture(scope="module")
def one_step_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one_step"))
    train.train(tiny_config(**{"training.max_steps": 1}), workdir)
    return workdir


def test_default_seed_is_secret_and_fresh():
    from configs import default

    assert default.get_config().seed == -1
    seeds = {train.run_seed(-1, None) for _ in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2**62 for s in seeds)
    assert train.run_seed(-1, 1234) == 1234  # a resumed run keeps its stored secret seed
    assert train.run_seed(7, None) == 7  # explicit, known seed: tests and debugging only


def test_training_log_records_label_accuracy(tmp_path):
    """training.label_accuracy_every: the real-data classifier labels balanced EMA samples in the log."""
    config = tiny_config(**{"training.max_steps": 3, "training.label_accuracy_every": 2,
                            "training.label_accuracy_num_samples": 9, "eval.label_classifier_epochs": 1})
    train.train(config, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    measured = {r["step"]: r for r in records if "label_accuracy" in r}
    assert sorted(measured) == [2, 3]  # every 2 steps and at the end
    for r in measured.values():
        assert r["label_accuracy_num_samples"] == 9
        assert r["label_accuracy"] in {k / 9 for k in range(10)}  # a fraction of the 9 samples


def test_label_accuracy_in_the_log_needs_a_conditional_builtin_dataset(tmp_path):
    from dpdm_jax import experiment

    config = tiny_config(**{"training.label_accuracy_every": 2, "data.conditional": False})
    with pytest.raises(ValueError, match="label_accuracy_every"):
        experiment.validate_config(config)


def test_preemption_watch_restores_the_previous_sigterm_handler():
    import signal
    import threading

    from dpdm_jax.preemption import PreemptionWatch

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set from the main thread")
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatch() as watch:
        assert not watch.reached(1)
        signal.raise_signal(signal.SIGTERM)  # caught: the flag, not the default action (death)
        assert watch.reached(2)
    assert signal.getsignal(signal.SIGTERM) == before
