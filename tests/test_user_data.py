"""Your own images: ImageFolder directories and .npz files, their fixed preprocessing, and every
broken input reported in one line naming the file, before any compute."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import test_tiny
from dpdm_jax import experiment
from dpdm_jax.data import (DataError, folder_class_names, inspect_npz, load_dataset,
                           load_image_folder, load_npz)
from dpdm_jax.data.user_data import preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------- writers

def noise(n, h, w, c, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def save(path, pixels, fmt="PNG", **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(path, fmt, **kw)
    return str(path)


def write_folder(root, per_class, size=8, channels=1, seed=0):
    """per_class: {class name: count}, or {None: count} for images directly in root."""
    for j, (name, count) in enumerate(per_class.items()):
        for i, pixels in enumerate(noise(count, size, size, channels, seed + j)):
            save(os.path.join(root, name or "", f"{i:03d}.png"), pixels)
    return str(root)


def tiny_user_config(name, path, **overrides):
    config = test_tiny.get_config()
    config.training.sample_every = -1
    config.data.name, config.data.path = name, str(path)
    config.data.image_size, config.data.channels = 8, 1
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


# ------------------------------------------------------------------------------- folders

def test_folder_with_classes_keeps_pixels_and_sorted_class_order(tmp_path):
    root = write_folder(tmp_path / "d", {"zebra": 2, "ant": 3, "mole": 1})
    save(tmp_path / "d" / "ant" / "deeper" / "x.png", noise(1, 8, 8, 1, 9)[0])  # walked recursively
    (tmp_path / "d" / "ant" / "notes.txt").write_text("ignored")
    (tmp_path / "d" / ".hidden").mkdir()  # ignored, not an empty class
    ds = load_image_folder(root, 8, 1, workers=2)
    assert ds.class_names == ("ant", "mole", "zebra") and ds.num_classes == 3
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 0, 1, 2, 2])
    assert ds.images.shape == (7, 8, 8, 1) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images[:3], noise(3, 8, 8, 1, 1))  # ant/000..002, exact
    np.testing.assert_array_equal(ds.images[3], noise(1, 8, 8, 1, 9)[0])  # ant/deeper/x.png last
    np.testing.assert_array_equal(ds.images[5:], noise(2, 8, 8, 1, 0))  # zebra
    assert folder_class_names(root) == ds.class_names
    np.testing.assert_array_equal(load_image_folder(root, 8, 1, workers=1).images, ds.images)


def test_folder_without_subfolders_is_unconditional(tmp_path):
    root = write_folder(tmp_path, {None: 4}, channels=3)
    ds = load_image_folder(root, 8, 3)
    assert ds.labels is None and ds.num_classes is None and ds.class_names is None
    np.testing.assert_array_equal(ds.images, noise(4, 8, 8, 3))
    config = tiny_user_config("folder", root, **{"data.channels": 3})
    with pytest.raises(ValueError, match="no class labels; set data.conditional=False"):
        experiment.validate_config(config)
    config.data.conditional = False
    experiment.validate_config(config)
    assert experiment.image_spec(config) == experiment.ImageSpec(8, 3, None)


def test_jpeg_and_webp_are_read(tmp_path):
    flat = np.full((8, 8, 3), 200, np.uint8)
    save(tmp_path / "a" / "x.JPG", flat, "JPEG", quality=95)
    save(tmp_path / "a" / "y.webp", flat, "WEBP", lossless=True)
    ds = load_image_folder(str(tmp_path), 8, 3)
    assert len(ds) == 2 and np.abs(ds.images.astype(int) - 200).max() <= 2
    np.testing.assert_array_equal(ds.images[1], flat)  # lossless WebP: exact


# ------------------------------------------------------------------------------- preprocessing

def test_centre_crop_of_a_wide_and_a_tall_image():
    wide = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6, 1)  # H=4, W=6: columns 1..4 kept
    out = preprocess(Image.fromarray(wide[:, :, 0]), 4, 1)
    np.testing.assert_array_equal(out, wide[:, 1:5])
    tall = np.arange(7 * 3, dtype=np.uint8).reshape(7, 3, 1)  # H=7, W=3: rows 2..4 kept
    np.testing.assert_array_equal(preprocess(Image.fromarray(tall[:, :, 0]), 3, 1), tall[2:5])


def test_resize_keeps_constants_and_halves():
    flat = Image.fromarray(np.full((10, 10), 93, np.uint8))
    np.testing.assert_array_equal(preprocess(flat, 4, 1), np.full((4, 4, 1), 93))
    halves = np.zeros((16, 16), np.uint8)
    halves[:, 8:] = 255
    out = preprocess(Image.fromarray(halves), 4, 1)[:, :, 0].astype(int)
    assert out.shape == (4, 4) and (out[:, 0] < 10).all() and (out[:, -1] > 245).all()
    assert (np.diff(out, axis=1) >= 0).all()


def test_grayscale_rgb_and_alpha_conversions():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)  # 1 x 3
    gray = preprocess(Image.fromarray(rgb).resize((3, 3), Image.NEAREST), 3, 1)
    np.testing.assert_array_equal(gray[0, :, 0], [76, 150, 29])  # ITU-R 601-2 luma
    g = np.array([[0, 128], [200, 255]], np.uint8)
    np.testing.assert_array_equal(preprocess(Image.fromarray(g), 2, 3), np.repeat(g[:, :, None], 3, -1))
    rgba = np.array([[[255, 255, 255, 0], [255, 255, 255, 255]]], np.uint8)  # transparent, opaque
    out = preprocess(Image.fromarray(rgba).resize((2, 2), Image.NEAREST), 2, 3)
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [255, 255, 255]])  # onto black
    with pytest.raises(DataError, match=r"x\.png: mode I;16"):
        preprocess(Image.fromarray(np.zeros((2, 2), np.uint16)), 2, 1, "x.png")


# ------------------------------------------------------------------------------- broken folders

def broken(tmp_path, kind):
    """A folder with one bad entry of `kind`; returns (root, the path the error must name)."""
    root = write_folder(tmp_path / "d", {"a": 2, "b": 2})
    bad = str(tmp_path / "d" / "b" / "bad.png")
    if kind == "unreadable":
        open(bad, "wb").write(b"this is not an image")
    elif kind == "truncated":
        save(bad, noise(1, 32, 32, 3, 5)[0])
        data = open(bad, "rb").read()
        open(bad, "wb").write(data[: len(data) // 2])
    elif kind == "16-bit":
        Image.fromarray(np.zeros((8, 8), np.uint16)).save(bad)
    elif kind == "empty class":
        bad = str(tmp_path / "d" / "c")
        os.makedirs(bad)
        open(os.path.join(bad, "readme.txt"), "w").write("no images")
    elif kind == "image beside classes":
        bad = save(tmp_path / "d" / "stray.png", noise(1, 8, 8, 1)[0])
    return root, bad


@pytest.mark.parametrize("kind, message", [
    ("unreadable", "unreadable or truncated image"), ("truncated", "unreadable or truncated image"),
    ("16-bit", "mode I;16"), ("empty class", "empty class folder"),
    ("image beside classes", "an image next to class subfolders")])
def test_broken_folder_names_the_file(tmp_path, kind, message):
    root, bad = broken(tmp_path, kind)
    with pytest.raises(DataError) as e:
        load_image_folder(root, 8, 1)
    assert str(e.value).startswith(bad + ":") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_folder_argument_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_image_folder(str(tmp_path / "nope"), 8, 1)
    with pytest.raises(DataError, match="no .png/.jpg/.jpeg/.webp files"):
        load_image_folder(str(tmp_path), 8, 1)
    with pytest.raises(DataError, match="channels must be 1"):
        load_image_folder(str(tmp_path), 8, 2)
    root = write_folder(tmp_path / "d", {"a": 1})
    for overrides, field in [({"data.image_size": 0}, "data.image_size"),
                             ({"data.channels": 0}, "data.channels"),
                             ({"data.path": str(tmp_path / "missing")}, "data.path"),
                             ({"data.path": ""}, "data.path")]:
        with pytest.raises(ValueError, match=field):
            experiment.validate_config(tiny_user_config("folder", root, **overrides))


# ------------------------------------------------------------------------------- npz

def test_npz_with_labels_and_class_names(tmp_path):
    images = noise(5, 6, 6, 3)
    path = str(tmp_path / "d.npz")
    np.savez(path, images=images, labels=np.array([1, 0, 1, 2, 0], np.int64),
             class_names=np.array(["cat", "dog", "eel"]))
    ds = load_npz(path)
    np.testing.assert_array_equal(ds.images, images)
    assert ds.labels.dtype == np.int32 and ds.class_names == ("cat", "dog", "eel")
    assert inspect_npz(path).image_shape == (5, 6, 6, 3)
    config = tiny_user_config("npz", path, **{"data.image_size": 0, "data.channels": 0})
    assert experiment.image_spec(config) == experiment.ImageSpec(6, 3, 3)
    small = load_npz(path, image_size=4, channels=1)  # the folder's preprocessing, per image
    assert small.images.shape == (5, 4, 4, 1)
    np.testing.assert_array_equal(small.images[2], preprocess(Image.fromarray(images[2]), 4, 1))


def test_npz_without_labels(tmp_path):
    path = str(tmp_path / "d.npz")
    np.savez_compressed(path, images=noise(3, 4, 4, 1))
    ds = load_npz(path)
    assert ds.labels is None and ds.class_names is None and ds.images.shape == (3, 4, 4, 1)
    assert inspect_npz(path).class_names is None


@pytest.mark.parametrize("arrays, message", [
    ({"images": noise(3, 4, 4, 1).astype(np.float32)}, "`images` must be uint8"),
    ({"images": noise(3, 4, 4, 1)[..., 0]}, "`images` must be uint8 of shape (N, H, W, C)"),
    ({"images": noise(3, 4, 4, 2)}, "C in (1, 3)"),
    ({"images": noise(3, 4, 4, 1), "labels": np.array([0, -1, 1])}, "labels out of range [0, 2)"),
    ({"images": noise(3, 4, 4, 1), "labels": np.array([0, 1, 2]), "class_names": np.array(["a", "b"])},
     "labels out of range [0, 2)"),
    ({"images": noise(3, 4, 4, 1), "labels": np.array([0, 2, 2])}, "classes have no images, e.g. class 1"),
    ({"images": noise(3, 4, 4, 1), "labels": np.array([0.0, 1.0, 1.0])}, "`labels` must be integers"),
    ({"images": noise(3, 4, 4, 1), "label": np.array([0, 1, 1])}, "unexpected arrays ['label']"),
    ({"pixels": noise(3, 4, 4, 1)}, "no `images` array"),
])
def test_broken_npz_names_the_file(tmp_path, arrays, message):
    path = str(tmp_path / "bad.npz")
    np.savez(path, **arrays)
    with pytest.raises(DataError) as e:
        load_npz(path)
    assert str(e.value).startswith(path + ":") and message in str(e.value), str(e.value)


def test_npz_not_a_zip_and_not_square(tmp_path):
    path = str(tmp_path / "bad.npz")
    open(path, "wb").write(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="corrupt or unreadable npz"):
        inspect_npz(path)
    np.savez(path, images=noise(2, 4, 6, 1))
    with pytest.raises(DataError, match="4x6, not square"):
        experiment.image_spec(tiny_user_config("npz", path, **{"data.image_size": 0,
                                                               "data.conditional": False}))
    assert load_npz(path, image_size=4).images.shape == (2, 4, 4, 1)


# ------------------------------------------------------------------------------- through main

def run_main(args, timeout=600):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "DPDM_DATA_NO_FETCH": "1",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    return subprocess.Popen([sys.executable, "-m", "dpdm_jax.main", "--config=configs/test_tiny.py",
                             "--config.training.sample_every=-1", "--config.data.image_size=8",
                             "--config.data.channels=1"] + args,
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_main_refuses_a_folder_too_small_for_delta_in_one_line(tmp_path):
    """N = 5 images and delta = 0.3 >= 1/N: known only once the folder is read, still before compute.
    (The file-naming errors are the loader's own, tested above; main prints them the same way.)"""
    tiny = write_folder(tmp_path / "tiny", {"a": 2, "b": 3})
    proc = run_main([f"--workdir={tmp_path / 'run'}", "--config.data.name=folder",
                     f"--config.data.path={tiny}", "--config.dp.delta=0.3"])
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: delta=0.3 >= 1/N=0.2"), last
    assert f"folder:{tiny}: 5 images" in stderr  # the log line before it names the folder and N
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow  # 518 s on the shared 2-core build machine (load average ~9), mostly XLA compiles
def test_main_trains_on_a_folder_of_real_fashion_mnist(tmp_path):
    """Two DP steps through `python -m dpdm_jax.main` on 60 Fashion-MNIST PNGs (28x28 -> 8x8) in 3
    classes: test_tiny's network, so the compilation cache of the other tiny runs applies."""
    try:
        real = load_dataset("fashion_mnist", "train")
    except DataError:
        pytest.skip("Fashion-MNIST is not cached")
    root = tmp_path / "fashion"
    names = {0: "t-shirt", 1: "trouser", 7: "sneaker"}
    for label, name in names.items():
        for i in np.flatnonzero(real.labels == label)[:20]:
            save(root / name / f"{i:05d}.png", real.images[i])
    workdir = tmp_path / "run"
    proc = run_main([f"--workdir={workdir}", "--config.data.name=folder", f"--config.data.path={root}",
                     "--config.training.max_steps=2"])
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "after 2/4 steps" in stdout  # N = 60, batch 16: T = 4
    assert "label i is class {0: 'sneaker', 1: 't-shirt', 2: 'trouser'}" in stderr
    ledger = json.load(open(workdir / "privacy_ledger.json"))
    assert ledger["dataset_size"] == 60 and ledger["steps"] == 2
