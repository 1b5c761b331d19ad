"""Readers for the datasets' own file formats; malformed input raises DataError naming the file.

- IDX (MNIST, Fashion-MNIST), raw or gzip: http://yann.lecun.com/exdb/mnist/ "FILE FORMATS".
- CIFAR-10 python batches (pickled dicts, b'data' (N, 3072) uint8 rows in CHW order, b'labels')
  and CIFAR-10 binary batches (records of 1 label byte + 3072 CHW pixel bytes).
- Downsampled ImageNet 32x32 batches (.npz or pickle; 'data' (N, 3072) CHW rows, 'labels' 1-based).
- CelebA partition list (list_eval_partition.txt / .csv) and the aligned-image preprocessing.
"""
from __future__ import annotations

import gzip
import io
import pickle
import zipfile
import zlib

import numpy as np

from dpdm_jax.data.dataset import DataError

# ----------------------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_bytes(path: str) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic bytes."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from e
    return raw


def parse_idx(data: bytes, source: str) -> np.ndarray:
    """Parses IDX bytes; checks magic, dims and exact length."""
    if len(data) < 4:
        raise DataError(f"{source}: not an IDX file (only {len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{source}: bad IDX magic number {data[:4].hex()} "
                        f"(expected 0000<type><ndim>)")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    if ndim == 0:
        raise DataError(f"{source}: IDX file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) < expected:
        raise DataError(
            f"{source}: truncated IDX file: dims {dims} need {expected} bytes, "
            f"file has {len(data)}")
    if len(data) > expected:
        raise DataError(
            f"{source}: IDX file too long: dims {dims} need {expected} bytes, file has {len(data)}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (raw or .gz)."""
    return parse_idx(read_bytes(path), path)


def idx_images_labels(images: np.ndarray, labels: np.ndarray, num_classes: int,
                      images_src: str, labels_src: str):
    """Validates an IDX image/label pair -> (uint8 (N, H, W, 1), int32 (N,))."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"{images_src}: expected uint8 images of 3 dims (N, H, W), got "
                        f"{images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{labels_src}: expected uint8 labels of 1 dim, got {labels.dtype} "
                        f"{labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_src} has {images.shape[0]} images but {labels_src} has "
                        f"{labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise DataError(f"{images_src}: the file holds no images")
    check_labels(labels, num_classes, labels_src)
    return images[..., None], labels.astype(np.int32)


def check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"{source}: labels out of range [0, {num_classes}): "
                        f"min {int(labels.min())}, max {int(labels.max())}")


# -------------------------------------------------------------------- CHW rows (CIFAR, ImageNet)

def chw_rows_to_nhwc(data, size: int, source: str) -> np.ndarray:
    """(N, 3*size*size) uint8 rows in channel-major (CHW) order -> (N, size, size, 3) uint8."""
    data = np.asarray(data)
    row = 3 * size * size
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row:
        raise DataError(f"{source}: expected uint8 data of shape (N, {row}), got {data.dtype} "
                        f"{data.shape}")
    if data.shape[0] == 0:
        raise DataError(f"{source}: the batch holds no images")
    return np.ascontiguousarray(data.reshape(-1, 3, size, size).transpose(0, 2, 3, 1))


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (no arbitrary code from data files)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def unpickle_dict(data: bytes, source: str) -> dict:
    """A pickled dict (Python 2 or 3 pickle) with its keys turned into str."""
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise DataError(f"{source}: corrupt or unreadable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _get(d: dict, key: str, source: str):
    if key not in d:
        raise DataError(f"{source}: missing key {key!r} (keys: {sorted(map(str, d))})")
    return d[key]


def _int_labels(labels, n: int, source: str) -> np.ndarray:
    try:
        labels = np.asarray(labels)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{source}: unreadable labels ({e})") from e
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: expected {n} integer labels, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


# -------------------------------------------------------------------------------------- CIFAR-10

def parse_cifar_pickle(data: bytes, source: str):
    """One CIFAR-10 python batch -> (uint8 (N, 32, 32, 3), int32 (N,))."""
    d = unpickle_dict(data, source)
    images = chw_rows_to_nhwc(_get(d, "data", source), 32, source)
    labels = _int_labels(_get(d, "labels", source), images.shape[0], source)
    check_labels(labels, 10, source)
    return images, labels.astype(np.int32)


def parse_cifar_binary(data: bytes, source: str):
    """One CIFAR-10 binary batch (data_batch_1.bin ...) -> (uint8 (N, 32, 32, 3), int32 (N,))."""
    record = 1 + 3072
    if len(data) == 0 or len(data) % record:
        raise DataError(f"{source}: length {len(data)} is not a positive multiple of the "
                        f"{record}-byte CIFAR-10 record (truncated or not a CIFAR-10 binary batch)")
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    labels = rows[:, 0].astype(np.int32)
    check_labels(labels, 10, source)
    return chw_rows_to_nhwc(rows[:, 1:], 32, source), labels


# ------------------------------------------------------------------------------ ImageNet 32x32

def read_imagenet_batch(path: str, size: int = 32):
    """One downsampled-ImageNet batch (.npz or pickle) -> (uint8 (N, s, s, 3), int32 0-based (N,)).

    The files store labels 1..1000; they are shifted to 0..999 (as tfds imagenet_resized does).
    """
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files if k in ("data", "labels")}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, KeyError) as e:
            raise DataError(f"{path}: corrupt or unreadable npz ({type(e).__name__}: {e})") from e
    else:
        d = unpickle_dict(read_bytes(path), path)
    images = chw_rows_to_nhwc(_get(d, "data", path), size, path)
    labels = _int_labels(_get(d, "labels", path), images.shape[0], path) - 1
    check_labels(labels, 1000, path + " (1-based labels shifted to 0-based)")
    return images, labels.astype(np.int32)


def npz_num_rows(path: str) -> int:
    """Number of examples in an ImageNet .npz batch, reading only its (small) labels member."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return int(np.shape(z["labels"])[0])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, KeyError,
            IndexError) as e:
        raise DataError(f"{path}: corrupt or unreadable npz ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------- CelebA

# Aligned CelebA images are 178 wide x 218 high. Following common practice in DP generative
# modelling (e.g. DP-Sinkhorn, GS-WGAN-style pipelines) we take the central 140x140 square, which
# holds the face, then downsample it to 32x32 or 64x64 with PIL's box (area-average) filter.
CELEBA_CROP = 140
CELEBA_RESAMPLE = "box"
CELEBA_PARTITIONS = {"train": 0, "valid": 1, "test": 2}


def read_celeba_partition(path: str) -> dict[str, list[str]]:
    """list_eval_partition.txt ('000001.jpg 0' lines) or the Kaggle .csv -> split -> file names."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read CelebA partition file {path}: {e}") from e
    out: dict[str, list[str]] = {k: [] for k in CELEBA_PARTITIONS}
    by_code = {str(v): k for k, v in CELEBA_PARTITIONS.items()}
    for i, line in enumerate(lines, 1):
        fields = line.replace(",", " ").split()
        if not fields or (i == 1 and fields[0] == "image_id"):
            continue
        if len(fields) != 2 or fields[1] not in by_code or not fields[0].lower().endswith(".jpg"):
            raise DataError(f"{path}:{i}: expected '<name>.jpg <0|1|2>', got {line!r}")
        out[by_code[fields[1]]].append(fields[0])
    if not any(out.values()):
        raise DataError(f"{path}: the partition file lists no images")
    return out


def celeba_preprocess(image, size: int, source: str = "image") -> np.ndarray:
    """A PIL image or an (H, W, 3) uint8 array -> (size, size, 3) uint8: centre crop, box resize."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    w, h = image.size
    c = min(CELEBA_CROP, w, h)
    left, top = (w - c) // 2, (h - c) // 2
    image = image.crop((left, top, left + c, top + c))
    image = image.resize((size, size), resample=Image.Resampling.BOX)
    arr = np.asarray(image, dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise DataError(f"{source}: preprocessing gave shape {arr.shape}")
    return arr


def load_celeba_jpeg(path: str, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return celeba_preprocess(im, size, path)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: corrupt or unreadable image ({e})") from e

