"""Bring your own images: an ImageFolder directory or an .npz file, held in memory as uint8.

    ds = load_image_folder("faces/", image_size=32, channels=3)  # class i = ds.class_names[i]
    ds = load_npz("faces.npz")                                   # size and channels from the file

Privacy unit: one image is one example. The guarantee protects the presence of any single image;
a person (or object) with k images is protected only at group level (docs/data.md). What the
files say about the dataset's shape -- N, the number of classes and their names -- is treated as
public, as for the built-in datasets.

Preprocessing is fixed, public and data-independent, so it adds no privacy cost:
  1. mode: 8-bit modes are converted to L (channels=1, ITU-R 601-2 luma: PIL's convert('L')) or
     RGB (channels=3; grayscale is replicated); transparent images are first composited onto
     black. 16-bit and float modes (I, I;16, F) have no fixed 8-bit mapping and are refused.
  2. centre crop to the largest square: side s = min(W, H), left = (W - s) // 2, top = (H - s) // 2.
  3. resize to image_size x image_size with PIL's Lanczos filter (as NVlabs/edm's dataset_tool);
     an image already of that size is left untouched, so pixels are exact.

Folder layout (torchvision's ImageFolder convention): DIR/<class>/**/*.png|jpg|jpeg|webp, classes
are the sorted subfolder names (label i = i-th name, code-point order), files are taken in sorted
relative-path order; DIR/*.png with no subfolders is an unlabelled (unconditional) dataset.
Entries whose names start with '.' are ignored, and so are files with other extensions.

npz layout: `images` uint8 (N, H, W, C) with C in {1, 3}; optional `labels` integers (N,); optional
`class_names` strings (K,), else K = max(labels) + 1. Every class must have at least one image.

Every problem raises DataError naming the offending file, before any decoding where possible.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
import zipfile
import zlib

import numpy as np

from dpdm_jax.data.dataset import DataError, Dataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
PIL_FORMATS = ("PNG", "JPEG", "WEBP")  # JPEG also opens multi-picture (MPO) camera files
CHANNELS = (1, 3)
RESAMPLE = "lanczos"
NPZ_KEYS = ("images", "labels", "class_names")
_CONVERTIBLE_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr")
_ALPHA_MODES = ("RGBA", "LA", "PA")


def check_target(image_size: int, channels: int, where: str) -> None:
    """The preprocessing target: a square side >= 1 and 1 (grayscale) or 3 (RGB) channels."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise DataError(f"{where}: image_size must be an integer >= 1, got {image_size!r}")
    if isinstance(channels, bool) or channels not in CHANNELS:
        raise DataError(f"{where}: channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


# ------------------------------------------------------------------------------- preprocessing

def preprocess(image, image_size: int, channels: int, where: str = "image") -> np.ndarray:
    """A PIL image -> uint8 (image_size, image_size, channels): mode, centre crop, resize."""
    from PIL import Image

    mode = image.mode
    if mode not in _CONVERTIBLE_MODES:
        raise DataError(f"{where}: mode {mode} (e.g. 16-bit or float pixels) has no fixed 8-bit "
                        f"conversion; save it as 8-bit grayscale or RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    side = min(w, h)
    if (w, h) != (side, side):
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != image_size:
        image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[:, :, None] if channels == 1 else pixels


def decode_image(path: str, image_size: int, channels: int) -> np.ndarray:
    """Decode one PNG/JPEG/WebP file and preprocess it; DataError names the file if it is bad."""
    from PIL import Image

    try:
        with Image.open(path, formats=PIL_FORMATS) as image:
            image.load()  # decode now: a truncated file fails here, not later
            return preprocess(image, image_size, channels, path)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable or truncated image ({type(e).__name__}: {e})") from e


def _map_into(out: np.ndarray, fn, items, workers: int | None) -> None:
    """out[i] = fn(items[i]) on a thread pool (PIL releases the GIL while decoding).

    The first failing item in order raises, so the same bad file is reported on every run."""
    workers = workers or min(8, os.cpu_count() or 1)
    if workers == 1:
        for i, item in enumerate(items):
            out[i] = fn(item)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for i, pixels in enumerate(pool.map(fn, items, chunksize=64)):
            out[i] = pixels


# ---------------------------------------------------------------------------------- folders

@dataclasses.dataclass(frozen=True)
class FolderLayout:
    """What a folder holds, found without decoding: files in order, their labels, class names."""

    root: str
    files: tuple[str, ...]  # absolute paths, class by class, sorted within each class
    labels: np.ndarray | None  # int32 (N,), or None without class subfolders
    class_names: tuple[str, ...] | None


def _visible(names):
    return sorted(n for n in names if not n.startswith("."))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _require_dir(path: str) -> str:
    if not isinstance(path, str) or not path:
        raise DataError(f"an image folder path is needed, got {path!r}")
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such directory (expected one subfolder of images per class, "
                        f"or images directly in it)")
    return root


def folder_class_names(path: str) -> tuple[str, ...] | None:
    """The sorted class subfolder names of `path`, or None if it has no subfolders (cheap)."""
    root = _require_dir(path)
    try:
        subdirs = [n for n in _visible(os.listdir(root)) if os.path.isdir(os.path.join(root, n))]
    except OSError as e:
        raise DataError(f"{root}: cannot list the folder ({e})") from e
    return tuple(subdirs) or None


def _files_under(directory: str) -> list[str]:
    """Image files below `directory`, recursively, in sorted relative-path order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, onerror=_raise_walk_error):
        dirnames[:] = _visible(dirnames)
        found += [os.path.join(dirpath, f) for f in _visible(filenames) if _is_image(f)]
    return sorted(found, key=lambda p: os.path.relpath(p, directory).split(os.sep))


def _raise_walk_error(e: OSError):
    raise DataError(f"{e.filename}: cannot list the folder ({e.strerror})") from e


def scan_folder(path: str) -> FolderLayout:
    """List a folder's images and check its layout, without decoding any of them."""
    root = _require_dir(path)
    class_names = folder_class_names(root)
    top_files = _visible(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n)))
    top_images = [n for n in top_files if _is_image(n)]
    skipped = len(top_files) - len(top_images)
    if class_names is None:
        if not top_images:
            raise DataError(f"{root}: no {'/'.join(IMAGE_EXTENSIONS)} files and no class subfolders")
        files, labels = [os.path.join(root, n) for n in top_images], None
    else:
        if top_images:
            raise DataError(f"{os.path.join(root, top_images[0])}: an image next to class "
                            f"subfolders; put every image in its class's subfolder (or remove "
                            f"the subfolders for an unlabelled dataset)")
        files, labels = [], []
        for label, name in enumerate(class_names):
            in_class = _files_under(os.path.join(root, name))
            if not in_class:
                raise DataError(f"{os.path.join(root, name)}: empty class folder (no "
                                f"{'/'.join(IMAGE_EXTENSIONS)} files); remove it or add images")
            files += in_class
            labels += [label] * len(in_class)
        labels = np.asarray(labels, np.int32)
    if skipped:
        log.info("%s: ignored %d top-level file(s) that are not images", root, skipped)
    return FolderLayout(root, tuple(files), labels, class_names)


def load_image_folder(path: str, image_size: int, channels: int,
                      workers: int | None = None) -> Dataset:
    """Every image of an ImageFolder directory, preprocessed, as uint8 (N, S, S, C) in memory.

    Labels are the indices of the sorted class subfolders (Dataset.class_names), or None when
    the images lie directly in `path`. workers: decoding threads (None: up to 8).
    """
    check_target(image_size, channels, str(path))
    t0 = time.time()
    layout = scan_folder(path)
    images = np.empty((len(layout.files), image_size, image_size, channels), np.uint8)
    _map_into(images, lambda p: decode_image(p, image_size, channels), layout.files, workers)
    ds = Dataset(images=images, labels=layout.labels,
                 num_classes=None if layout.class_names is None else len(layout.class_names),
                 name=f"folder:{layout.root}", class_names=layout.class_names)
    log.info("loaded %d images (%d classes) from %s in %.2f s", len(ds),
             ds.num_classes or 0, layout.root, time.time() - t0)
    return ds


# ---------------------------------------------------------------------------------- npz files

@dataclasses.dataclass(frozen=True)
class NpzSummary:
    """What an .npz holds, read without its image data: shape, labels' classes."""

    path: str
    image_shape: tuple[int, int, int, int]  # (N, H, W, C)
    class_names: tuple[str, ...] | None  # None: no labels; else K names ('0'..'K-1' by default)


def _npy_header(zf: zipfile.ZipFile, member: str):
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, _, dtype = reader(f)
    return shape, dtype


def _npz_members(path: str):
    """(images shape, images dtype, labels or None, class_names array or None), images unread."""
    if not isinstance(path, str) or not path:
        raise DataError(f"an .npz file path is needed, got {path!r}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (expected an .npz with uint8 `images` (N, H, W, C))")
    try:
        with zipfile.ZipFile(path) as zf:
            keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            if "images" not in keys:
                raise DataError(f"{path}: no `images` array (found {keys})")
            extra = sorted(set(keys) - set(NPZ_KEYS))
            if extra:
                raise DataError(f"{path}: unexpected arrays {extra}; expected `images` and "
                                f"optionally `labels` and `class_names`")
            shape, dtype = _npy_header(zf, "images.npy")
        with np.load(path, allow_pickle=False) as z:
            labels = z["labels"] if "labels" in keys else None
            names = z["class_names"] if "class_names" in keys else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, KeyError) as e:
        raise DataError(f"{path}: corrupt or unreadable npz ({type(e).__name__}: {e})") from e
    return tuple(shape), dtype, labels, names


def _check_npz(path, shape, dtype, labels, names) -> tuple[str, ...] | None:
    if dtype != np.uint8 or len(shape) != 4 or shape[3] not in CHANNELS or min(shape) < 1:
        raise DataError(f"{path}: `images` must be uint8 of shape (N, H, W, C) with N, H, W >= 1 "
                        f"and C in {CHANNELS}; got {dtype} {shape} (add a channel axis to "
                        f"(N, H, W) grayscale with images[..., None])")
    if labels is None:
        if names is not None:
            raise DataError(f"{path}: `class_names` without `labels`")
        return None
    if labels.shape != shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: `labels` must be integers of shape ({shape[0]},); got "
                        f"{labels.dtype} {labels.shape}")
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US" or len(set(names.tolist())) != len(names):
            raise DataError(f"{path}: `class_names` must be distinct strings of shape (K,); got "
                            f"{names.dtype} {names.shape}")
        names = tuple(str(n) for n in names.tolist())
    lo, hi = int(labels.min()), int(labels.max())
    k = len(names) if names is not None else hi + 1
    if lo < 0 or hi >= k:
        raise DataError(f"{path}: labels out of range [0, {k}): min {lo}, max {hi}")
    empty = np.flatnonzero(np.bincount(labels, minlength=k) == 0)
    if len(empty):
        raise DataError(f"{path}: {len(empty)} of {k} classes have no images, e.g. class "
                        f"{int(empty[0])}; relabel to 0..K-1 or drop those class names")
    return names if names is not None else tuple(str(i) for i in range(k))


def inspect_npz(path: str) -> NpzSummary:
    """Check an .npz file's arrays and read its shape and classes without loading the images."""
    shape, dtype, labels, names = _npz_members(path)
    return NpzSummary(path, shape, _check_npz(path, shape, dtype, labels, names))


def npz_target(summary: NpzSummary, image_size: int = 0, channels: int = 0) -> tuple[int, int]:
    """(image_size, channels) after preprocessing; 0 keeps the file's (square) size/channels."""
    _, h, w, c = summary.image_shape
    if not image_size and h != w:
        raise DataError(f"{summary.path}: images are {h}x{w}, not square; give an image_size to "
                        f"centre-crop and resize them to")
    target = (image_size or h, channels or c)
    check_target(*target, summary.path)
    return target


def load_npz(path: str, image_size: int = 0, channels: int = 0,
             workers: int | None = None) -> Dataset:
    """An .npz's `images` (and `labels`) in memory; preprocessed only if size/channels differ."""
    t0 = time.time()
    shape, dtype, labels, names = _npz_members(path)
    summary = NpzSummary(path, shape, _check_npz(path, shape, dtype, labels, names))
    size, ch = npz_target(summary, image_size, channels)
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z["images"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or unreadable `images` ({type(e).__name__}: {e})") from e
    if shape[1:] != (size, size, ch):
        from PIL import Image

        out = np.empty((shape[0], size, size, ch), np.uint8)
        _map_into(out, lambda i: preprocess(Image.fromarray(images[i].squeeze(-1) if shape[3] == 1
                                                            else images[i]),
                                            size, ch, f"{path}[{i}]"), range(shape[0]), workers)
        images = out
    classes = summary.class_names
    ds = Dataset(images=np.ascontiguousarray(images), labels=labels,
                 num_classes=None if classes is None else len(classes), name=f"npz:{path}",
                 class_names=classes)
    log.info("loaded %d images (%d classes) from %s in %.2f s", len(ds), ds.num_classes or 0, path,
             time.time() - t0)
    return ds
