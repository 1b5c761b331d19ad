"""A publishable release (--mode=export) holds no seed and samples alone; samples as a dataset (issue 13)."""
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import release as release_config
from dpdm_jax import export, release, sample, train
from dpdm_jax.data import load_image_folder
from dpdm_jax.dp import PrivacyLedger
from helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWN_SEED = 0x2BADC0DE5EED1234  # a fixed (public) training seed we can search for


def seed_needles(seed):
    words = np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
    needles = [str(seed).encode(), hex(seed).encode(), hex(seed)[2:].encode(), np.array(seed, "<i8").tobytes(),
               np.array(seed, ">i8").tobytes(), words.tobytes(), words[::-1].tobytes()]
    for w in words:
        needles += [np.array(w, "<u4").tobytes(), np.array(w, ">u4").tobytes(), str(int(w)).encode()]
    return needles


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("release") / "run")
    train.train(tiny_config(**{"seed": KNOWN_SEED, "training.max_steps": 2}), workdir)
    return workdir


def test_export_holds_no_seed_and_no_private_state(run_dir, capfd, tmp_path):
    config = tiny_config(**{"seed": KNOWN_SEED, "export.dir": str(tmp_path / "rel")})
    directory = export.run(config, run_dir)
    out, err = capfd.readouterr()
    assert "NO guarantee: the seed is public" in out and "THIS RELEASE CARRIES NO PRIVACY GUARANTEE" in out
    files = sorted(os.listdir(directory))
    assert files == sorted(release.FILES)  # no optimiser state, metrics, FID statistics, ledger with the seed
    blobs = {f: open(os.path.join(directory, f), "rb").read() for f in files}
    with np.load(os.path.join(directory, release.WEIGHTS)) as z:  # the arrays' own bytes too
        blobs.update({f"weights:{k}": z[k].tobytes() for k in z.files})
        assert not any(k.startswith(("opt_state", "params/", "step")) for k in z.files)
    for name, blob in blobs.items():
        for needle in seed_needles(KNOWN_SEED):
            assert needle not in blob, f"the seed appears in {name}"
    manifest = json.load(open(os.path.join(directory, release.MANIFEST)))
    assert manifest["seed_secret"] is False and manifest["has_guarantee"] is False
    assert manifest["WARNING"].startswith("THIS RELEASE CARRIES NO PRIVACY GUARANTEE: NO guarantee")
    ledger = PrivacyLedger.load(os.path.join(run_dir, "privacy_ledger.json"))
    assert manifest["steps_T"] == 2 and manifest["dataset_size_N"] == 64 and manifest["dataset"] == "synthetic"
    assert manifest["epsilon"] == pytest.approx(ledger.epsilon(2))
    assert manifest["noise_multiplier_sigma"] == ledger.noise_multiplier and manifest["clip_norm_C"] == 1.0
    assert manifest["sampling_rate_q"] == 0.25 and manifest["accountant"] == "rdp" and manifest["delta"] == 1e-3
    assert manifest["code_version"]["dpdm_jax"] and "seed" in manifest["not_included"]
    model = json.load(open(os.path.join(directory, release.MODEL)))
    assert model["class_names"] == ["0", "1", "2"] and model["network"]["nf"] == 8
    # An existing release is never overwritten; a missing checkpoint step is an error.
    with pytest.raises(release.ReleaseError, match="already exists and is not empty"):
        export.run(config, run_dir)
    with pytest.raises(ValueError, match=r"export.step=3: no checkpoint of that step .* steps \[2\]"):
        export.run(tiny_config(**{"export.step": 3, "export.dir": str(tmp_path / "other")}), run_dir)


def test_release_samples_alone_like_its_checkpoint_with_a_png_tree(run_dir, tmp_path):
    directory = export.run(tiny_config(**{"export.dir": str(tmp_path / "rel")}), run_dir)
    moved = str(tmp_path / "sent" / "release")
    shutil.copytree(directory, moved)
    shutil.rmtree(directory)
    # The reference: the checkpoint's own samples with the same public sampling seed.
    ckpt = tiny_config(**{"sampling.seed": 7, "sampling.num_samples": 7, "sampling.batch_size": 3})
    ref = np.load(sample.run(ckpt, run_dir))
    config = release_config.get_config(moved)
    config.sampling.seed, config.sampling.write_png, config.sampling.num_samples = 7, True, 7
    config.sampling.batch_size = 3  # 3 batches, the last one cut
    out = str(tmp_path / "out")
    path = sample.run(config, out)
    got = np.load(path)
    np.testing.assert_array_equal(got["images"], ref["images"])  # same weights, network and stream
    np.testing.assert_array_equal(got["labels"], np.arange(7) % 3)
    manifest = json.load(open(os.path.join(out, "samples", "samples_step2.json")))
    assert manifest["privacy"].startswith("NO guarantee: the seed is public") and manifest["sampling_seed"] == 7
    assert manifest["source"]["release"] == moved and manifest["guarantee"]["steps_T"] == 2
    tree = os.path.join(out, "samples", "step2")
    assert sorted(os.listdir(tree)) == ["0", "1", "2", "manifest.json"]
    assert json.load(open(os.path.join(tree, "manifest.json")))["has_guarantee"] is False
    ds = load_image_folder(tree, 8, 1)  # any ImageFolder reader reads it, ours included
    assert len(ds) == 7 and ds.class_names == ("0", "1", "2")
    np.testing.assert_array_equal(np.sort(ds.images.reshape(7, -1), 0), np.sort(got["images"].reshape(7, -1), 0))
    # The sampling randomness is the sampling seed's: fresh by default, never the training seed's.
    with pytest.raises(ValueError, match="already exists and is not empty"):
        sample.run(config, out)
    config.sampling.seed, config.sampling.write_png = -1, False
    sample.run(config, out)
    fresh = json.load(open(os.path.join(out, "samples", "samples_step2.json")))["sampling_seed"]
    assert fresh not in (7, KNOWN_SEED, 0)


def _broken(tmp_path, run_dir, kind):
    directory = export.run(tiny_config(**{"export.dir": str(tmp_path / "rel")}), run_dir)
    if kind == "missing":
        return str(tmp_path / "nope")
    if kind == "not_a_release":
        os.remove(os.path.join(directory, release.MANIFEST))
    elif kind == "no_weights":
        os.remove(os.path.join(directory, release.WEIGHTS))
    elif kind == "edited_weights":
        blob = bytearray(open(os.path.join(directory, release.WEIGHTS), "rb").read())
        blob[len(blob) // 2] ^= 1  # one flipped bit in the array data
        open(os.path.join(directory, release.WEIGHTS), "wb").write(bytes(blob))
    elif kind == "bad_json":
        open(os.path.join(directory, release.MODEL), "w").write("{")
    return directory


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"), ("not_a_release", "not a dpdm_jax release"),
    ("no_weights", "incomplete release"), ("edited_weights", "SHA-256 differs"), ("bad_json", "unreadable JSON")])
def test_broken_release_is_one_clear_error(run_dir, tmp_path, kind, message):
    with pytest.raises(release.ReleaseError, match=message):
        sample.run(release_config.get_config(_broken(tmp_path, run_dir, kind)), str(tmp_path / "out"))


def test_manifest_says_why_there_is_no_guarantee():
    ledger = PrivacyLedger(100, 0.1, 1.0, 1e-3, 1.0, steps=3, planned_steps=10)
    assert release.privacy_manifest(ledger)["guarantee"].startswith("(") and release.privacy_manifest(ledger)["has_guarantee"]
    ledger.private = False
    fields = release.privacy_manifest(ledger)
    assert fields["guarantee"].startswith("NO PRIVACY") and fields["epsilon"] is None and not fields["has_guarantee"]
    json.dumps(fields, allow_nan=False)


def test_main_export_and_sample_errors_are_one_line(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    for args in (["--config=configs/test_tiny.py", "--mode=export", f"--workdir={tmp_path / 'empty'}"],
                 [f"--config=configs/release.py:{tmp_path / 'nothing'}", "--mode=sample", f"--workdir={tmp_path}"]):
        out = subprocess.run([sys.executable, "-m", "dpdm_jax.main"] + args, cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
        last = out.stderr.strip().splitlines()[-1]
        assert out.returncode == 2 and "Traceback" not in out.stderr and last.startswith("error: "), out.stderr[-2000:]
    assert "does not exist" in last
    assert not glob.glob(str(tmp_path / "empty" / "release*"))


@pytest.mark.slow  # three `python -m dpdm_jax.main` runs on the shared 2-core machine
def test_real_image_folder_trains_exports_and_samples_from_the_release_alone(tmp_path):
    """Issue 13's 'done when': Fashion-MNIST PNGs in class folders -> 2 DP steps -> export ->
    the release copied elsewhere, the run deleted -> samples and a PNG tree from the release."""
    from dpdm_jax.data import DataError, load_dataset
    from PIL import Image

    try:
        real = load_dataset("fashion_mnist", "train")
    except DataError:
        pytest.skip("Fashion-MNIST is not cached")
    root = tmp_path / "fashion"
    for label, name in {0: "t-shirt", 1: "trouser", 7: "sneaker"}.items():
        os.makedirs(root / name)
        for i in np.flatnonzero(real.labels == label)[:20]:
            Image.fromarray(real.images[i, ..., 0]).save(root / name / f"{i:05d}.png")
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "DPDM_DATA_NO_FETCH": "1",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}

    def main(*args):
        out = subprocess.run([sys.executable, "-m", "dpdm_jax.main", *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    workdir = tmp_path / "run"
    data = ["--config=configs/test_tiny.py", f"--workdir={workdir}", "--config.data.name=folder",
            f"--config.data.path={root}", "--config.data.image_size=8", "--config.data.channels=1"]
    main(*data, "--config.training.max_steps=2", "--config.training.sample_every=-1")
    assert "Release" in main(*data, "--mode=export").stdout
    sent = tmp_path / "sent"
    shutil.copytree(workdir / "release", sent)
    shutil.rmtree(workdir)
    shutil.rmtree(root)
    out = tmp_path / "out"
    main(f"--config=configs/release.py:{sent}", f"--workdir={out}", "--mode=sample",
         "--config.sampling.num_samples=9", "--config.sampling.batch_size=4", "--config.sampling.write_png=True")
    samples = np.load(out / "samples" / "samples_step2.npz")
    assert samples["images"].shape == (9, 8, 8, 1)
    tree = out / "samples" / "step2"
    assert sorted(os.listdir(tree)) == ["manifest.json", "sneaker", "t-shirt", "trouser"]
    assert len(glob.glob(str(tree / "*" / "*.png"))) == 9
    manifest = json.load(open(tree / "manifest.json"))
    assert manifest["guarantee"]["dataset_size_N"] == 60 and manifest["guarantee"]["dataset"] == "folder"
    assert manifest["privacy"].startswith("NO guarantee: the seed is public")  # test_tiny's fixed seed
