"""Per-dataset readers for sources (1) local directories in the standard formats and (2) a prepared
tensorflow-datasets (array_record) directory. Neither touches the network.

Each reader returns a Dataset, or None when its source is simply absent; files that are present
but broken raise DataError (so a bad copy is reported instead of silently skipped).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import logging
import os
import tarfile
import zlib

import numpy as np

import dpdm_jax.data.formats as formats
from dpdm_jax.data.dataset import DataError, Dataset

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Spec:
    splits: tuple[str, ...]
    image_shape: tuple[int, int, int]
    num_classes: int | None
    tfds_name: str
    tfds_splits: dict  # our split name -> tfds split name


SPECS = {
    "mnist": Spec(("train", "test"), (28, 28, 1), 10, "mnist", {}),
    "fashion_mnist": Spec(("train", "test"), (28, 28, 1), 10, "fashion_mnist", {}),
    "cifar10": Spec(("train", "test"), (32, 32, 3), 10, "cifar10", {}),
    "celeba32": Spec(("train", "valid", "test"), (32, 32, 3), None, "celeb_a",
                     {"valid": "validation"}),
    "celeba64": Spec(("train", "valid", "test"), (64, 64, 3), None, "celeb_a",
                     {"valid": "validation"}),
    "imagenet32": Spec(("train", "val"), (32, 32, 3), 1000, "imagenet_resized/32x32",
                       {"val": "validation"}),
}

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def mnist_dirs(name: str, data_dir: str) -> list[str]:
    """Where IDX files are looked for; the first one is where fetched files are written."""
    if name == "mnist":
        subs = ["mnist", "MNIST/raw", "MNIST"]
    else:
        subs = ["fashion_mnist", "fashion-mnist", "FashionMNIST/raw", "FashionMNIST"]
    return [os.path.join(data_dir, s) for s in subs]


def _make(name, split, images, labels) -> Dataset:
    spec = SPECS[name]
    if images.shape[1:] != spec.image_shape:
        raise DataError(f"{name}/{split}: images have shape {images.shape[1:]}, expected "
                        f"{spec.image_shape}")
    return Dataset(images=images, labels=labels, num_classes=spec.num_classes,
                   name=f"{name}/{split}")


def _find_idx(directory: str, base: str) -> str | None:
    dotted = base.replace("-idx", ".idx")  # e.g. Kaggle's train-images.idx3-ubyte
    for cand in (base, base + ".gz", dotted, dotted + ".gz"):
        path = os.path.join(directory, cand)
        if os.path.isfile(path):
            return path
    return None


def load_idx_local(name: str, split: str, data_dir: str) -> Dataset | None:
    img_base, lab_base = IDX_FILES[split]
    for d in mnist_dirs(name, data_dir):
        img = _find_idx(d, img_base)
        if img is None:
            continue
        lab = _find_idx(d, lab_base)
        if lab is None:
            raise DataError(f"found {img} but no {lab_base}[.gz] next to it in {d}")
        images, labels = formats.idx_images_labels(formats.read_idx(img), formats.read_idx(lab),
                                                   10, img, lab)
        return _make(name, split, images, labels)
    return None


def _concat(parts, name, split):
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]).astype(np.int32)
    return _make(name, split, images, labels)


_CIFAR_LAYOUTS = (  # (directory, tarball, member suffix, parser)
    ("cifar-10-batches-py", "cifar-10-python.tar.gz", "", formats.parse_cifar_pickle),
    ("cifar-10-batches-bin", "cifar-10-binary.tar.gz", ".bin", formats.parse_cifar_binary),
)


def load_cifar_local(name: str, split: str, data_dir: str) -> Dataset | None:
    batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    for root in (os.path.join(data_dir, "cifar10"), data_dir):
        for sub, _, suffix, parse in _CIFAR_LAYOUTS:
            d = os.path.join(root, sub)
            if os.path.isdir(d):
                paths = [os.path.join(d, b + suffix) for b in batches]
                missing = [p for p in paths if not os.path.isfile(p)]
                if missing:
                    raise DataError(f"CIFAR-10 directory {d} is incomplete: missing {missing}")
                return _concat([parse(formats.read_bytes(p), p) for p in paths], name, split)
        for sub, tarball, suffix, parse in _CIFAR_LAYOUTS:
            t = os.path.join(root, tarball)
            if os.path.isfile(t):
                return _concat(_read_tar_members(t, sub, batches, suffix, parse), name, split)
    return None


def _read_tar_members(tar_path, sub, batches, suffix, parse):
    parts = []
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for b in batches:
                member = f"{sub}/{b}{suffix}"
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    f = None
                if f is None:
                    raise DataError(f"{tar_path}: missing member {member}")
                parts.append(parse(f.read(), f"{tar_path}:{member}"))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{tar_path}: corrupt or truncated archive ({e})") from e
    return parts


def _first(paths):
    return next((p for p in paths if os.path.exists(p)), None)


def load_celeba_local(name: str, split: str, data_dir: str) -> Dataset | None:
    size = SPECS[name].image_shape[0]
    for root in (os.path.join(data_dir, "celeba"), os.path.join(data_dir, "CelebA"), data_dir):
        img_dir = _first([os.path.join(root, "img_align_celeba", "img_align_celeba"),
                          os.path.join(root, "img_align_celeba"),
                          os.path.join(root, "Img", "img_align_celeba")])
        if img_dir is None or not os.path.isdir(img_dir):
            continue
        part = _first([os.path.join(root, "list_eval_partition.txt"),
                       os.path.join(root, "Eval", "list_eval_partition.txt"),
                       os.path.join(root, "list_eval_partition.csv")])
        if part is None:
            raise DataError(f"found CelebA images in {img_dir} but no list_eval_partition.txt "
                            f"in {root} (or {root}/Eval)")
        files = formats.read_celeba_partition(part)[split]
        if not files:
            raise DataError(f"{part}: split {split!r} is empty")
        return _make(name, split, _celeba_images(root, img_dir, part, files, size, split), None)
    return None


def _celeba_images(root, img_dir, part, files, size, split) -> np.ndarray:
    cache = os.path.join(root, "cache", f"celeba{size}_{split}_crop{formats.CELEBA_CROP}_"
                                        f"{formats.CELEBA_RESAMPLE}.npy")
    if os.path.isfile(cache) and os.path.getmtime(cache) >= os.path.getmtime(part):
        try:
            arr = np.load(cache, allow_pickle=False)
            if arr.dtype == np.uint8 and arr.shape == (len(files), size, size, 3):
                return arr
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable CelebA cache %s: %s", cache, e)
    present = set(os.listdir(img_dir))
    missing = [f for f in files if f not in present]
    if missing:
        raise DataError(f"{len(missing)} CelebA images listed in {part} are missing from "
                        f"{img_dir}, e.g. {missing[:3]}")
    log.info("decoding %d CelebA images from %s (cached afterwards in %s)", len(files), img_dir,
             cache)
    out = np.empty((len(files), size, size, 3), np.uint8)
    paths = [os.path.join(img_dir, f) for f in files]
    workers = min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL
        for start in range(0, len(paths), 4096):
            chunk = paths[start:start + 4096]
            out[start:start + len(chunk)] = list(
                pool.map(lambda p: formats.load_celeba_jpeg(p, size), chunk))
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.tmp{os.getpid()}.npy"
        np.save(tmp, out)
        os.replace(tmp, cache)
    except OSError as e:
        log.warning("could not write CelebA cache %s: %s", cache, e)
    return out


def load_imagenet_local(name: str, split: str, data_dir: str) -> Dataset | None:
    if split == "train":
        layouts = [("Imagenet32_train_npz", [f"train_data_batch_{i}.npz" for i in range(1, 11)]),
                   ("Imagenet32_train", [f"train_data_batch_{i}" for i in range(1, 11)])]
    else:
        layouts = [("Imagenet32_val_npz", ["val_data.npz"]), ("Imagenet32_val", ["val_data"])]
    for root in (os.path.join(data_dir, "imagenet32"), os.path.join(data_dir, "imagenet"),
                 data_dir):
        for sub, names in layouts:
            d = os.path.join(root, sub)
            if not os.path.isdir(d):
                continue
            paths = [os.path.join(d, n) for n in names]
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise DataError(f"ImageNet 32x32 directory {d} is incomplete: missing {missing}")
            if not sub.endswith("_npz"):
                return _concat([formats.read_imagenet_batch(p) for p in paths], name, split)
            # Preallocate (ImageNet32 train is 3.9 GB) instead of concatenating copies.
            counts = [formats.npz_num_rows(p) for p in paths]
            images = np.empty((sum(counts), 32, 32, 3), np.uint8)
            labels = np.empty(sum(counts), np.int32)
            start = 0
            for p, c in zip(paths, counts):
                im, lab = formats.read_imagenet_batch(p)
                if im.shape[0] != c:
                    raise DataError(f"{p}: {im.shape[0]} images but {c} labels")
                images[start:start + c], labels[start:start + c] = im, lab
                start += c
            return _make(name, split, images, labels)
    return None


LOCAL_READERS = {"mnist": load_idx_local, "fashion_mnist": load_idx_local,
                 "cifar10": load_cifar_local, "celeba32": load_celeba_local,
                 "celeba64": load_celeba_local, "imagenet32": load_imagenet_local}


# ----------------------------------------------------------------------------- tensorflow-datasets

def tfds_roots(data_dir: str, tfds_dir: str | None = None) -> list[str]:
    roots = [tfds_dir, os.path.join(data_dir, "tensorflow_datasets"),
             os.path.join(os.path.expanduser("~"), "tensorflow_datasets")]
    return [r for r in roots if r]


def _version_key(path):
    try:
        return tuple(int(x) for x in os.path.basename(path).split("."))
    except ValueError:
        return (-1,)


def find_tfds_prepared(tfds_name: str, tfds_split: str, data_dir: str, notes: list,
                       tfds_dir: str | None = None) -> str | None:
    """The newest <root>/<tfds_name>/<version>/ holding dataset_info.json and array_record files."""
    for root in tfds_roots(data_dir, tfds_dir):
        versions = sorted(glob.glob(os.path.join(root, tfds_name, "*.*.*")), key=_version_key,
                          reverse=True)
        for v in versions:
            if not os.path.isfile(os.path.join(v, "dataset_info.json")):
                continue
            if glob.glob(os.path.join(v, f"*-{tfds_split}.array_record*")):
                return v
            if glob.glob(os.path.join(v, f"*-{tfds_split}.tfrecord*")):
                notes.append(f"{v} is prepared as tfrecord, which needs TensorFlow to read; "
                             f"re-prepare it with file_format='array_record'")
    return None


def load_tfds(name: str, split: str, data_dir: str, notes: list, tfds_dir: str | None = None) -> Dataset | None:
    spec = SPECS[name]
    tfds_split = spec.tfds_splits.get(split, split)
    version_dir = find_tfds_prepared(spec.tfds_name, tfds_split, data_dir, notes, tfds_dir)
    if version_dir is None:
        notes.append(f"no prepared tfds dataset {spec.tfds_name} (array_record) under "
                     f"{', '.join(tfds_roots(data_dir, tfds_dir))}")
        return None
    try:
        import tensorflow_datasets as tfds
    except Exception as e:  # noqa: BLE001 - any import failure just disables this source
        notes.append(f"tensorflow_datasets is not importable ({e}); skipped {version_dir}")
        return None
    try:  # builder_from_directory reads dataset_info.json: no registry, no download possible.
        source = tfds.builder_from_directory(version_dir).as_data_source(split=tfds_split)
        n = len(source)
    except Exception as e:  # noqa: BLE001
        notes.append(f"tfds could not open {version_dir} split {tfds_split}: {e}")
        return None
    if n == 0:
        raise DataError(f"{version_dir}: split {tfds_split} is empty")
    log.info("reading %d examples of %s from %s", n, spec.tfds_name, version_dir)
    size = spec.image_shape[0]
    images = np.empty((n,) + spec.image_shape, np.uint8)
    labels = np.empty(n, np.int64) if spec.num_classes else None
    try:
        for start in range(0, n, 1024):
            idx = list(range(start, min(n, start + 1024)))
            for i, ex in zip(idx, source.__getitems__(idx)):
                img = np.asarray(ex["image"])
                if name.startswith("celeba"):
                    img = formats.celeba_preprocess(img, size, f"{version_dir}[{i}]")
                images[i] = img
                if labels is not None:
                    labels[i] = int(ex["label"])
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{version_dir}: failed reading example of split {tfds_split}: "
                        f"{type(e).__name__}: {e}") from e
    if labels is not None:
        formats.check_labels(labels, spec.num_classes, version_dir)
        labels = labels.astype(np.int32)
    return _make(name, split, images, labels)
