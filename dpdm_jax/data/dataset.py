"""The in-memory dataset type, the fixed pixel <-> model-range map, and a synthetic dataset.

Images are held as uint8 (N, H, W, C) in host memory; models see float32 in [-1, 1] through the
fixed affine map x / 127.5 - 1 (method.md: "Data are scaled to [-1, 1] by a fixed map").
"""
from __future__ import annotations

import dataclasses

import numpy as np


class DataError(ValueError):
    """A dataset is missing, malformed, or fails verification. The message says what to do."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A whole split in memory.

    images: uint8 (N, H, W, C), N >= 1.
    labels: int32 (N,) with values in [0, num_classes), or None for unlabelled data (CelebA).
    num_classes: number of classes when labels are given, else None.
    name: e.g. 'mnist/train'.
    class_names: optional names of the classes, label i being class_names[i] (user folders: the
      sorted subfolder names), so that sampled labels can be mapped back.

    Integer labels of another dtype are converted to int32; anything else invalid raises DataError.
    """

    images: np.ndarray
    labels: np.ndarray | None
    num_classes: int | None
    name: str
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(
                f"{self.name}: images must be a uint8 numpy array of shape (N, H, W, C); got "
                f"{type(images).__name__} {getattr(images, 'dtype', '?')} "
                f"{getattr(images, 'shape', '?')}")
        n = images.shape[0]
        if n == 0 or min(images.shape[1:]) == 0:
            raise DataError(f"{self.name}: the dataset is empty (images shape {images.shape})")
        if self.labels is None:
            if self.num_classes is not None or self.class_names is not None:
                raise DataError(f"{self.name}: num_classes={self.num_classes}, class_names="
                                f"{self.class_names} but no labels")
            return
        labels = np.asarray(self.labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{self.name}: labels must be integers of shape ({n},); got {labels.dtype} "
                f"{labels.shape}")
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1:
            raise DataError(f"{self.name}: labels given but num_classes={self.num_classes!r}")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.num_classes:
            raise DataError(
                f"{self.name}: labels out of range [0, {self.num_classes}): min {lo}, max {hi}")
        if labels.dtype != np.int32:
            labels = labels.astype(np.int32)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "num_classes", int(self.num_classes))
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise DataError(f"{self.name}: {len(self.class_names)} class names for "
                            f"{self.num_classes} classes")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(int(d) for d in self.images.shape[1:])


def to_model_range(images_uint8):
    """uint8 pixels -> float32 in [-1, 1] via x / 127.5 - 1.

    Works on numpy arrays and on jax arrays (also inside jit): only array methods are used.
    Refuses non-uint8 input, so already-scaled data cannot be scaled twice by mistake.
    """
    x = images_uint8 if hasattr(images_uint8, "astype") else np.asarray(images_uint8)
    if x.dtype != np.uint8:
        raise TypeError(f"to_model_range expects uint8 pixels, got dtype {x.dtype}")
    return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def from_model_range(x):
    """float in [-1, 1] -> uint8 pixels: round((x + 1) * 127.5), clipped to [0, 255].

    The exact inverse of to_model_range on uint8 values. Any concrete input (numpy, jax, lists)
    gives a numpy array, ready for PIL; NaN maps to 0. Inside jax.jit (a traced input) the same
    arithmetic runs on the traced array and a traced uint8 array is returned.
    """
    try:
        x = np.asarray(x, dtype=np.float32)
    except TypeError:  # a jax tracer: it cannot become numpy, so use its own array methods
        y = (x.astype(np.float32) + np.float32(1.0)) * np.float32(127.5)
        return y.round().clip(0.0, 255.0).astype(np.uint8)
    y = np.nan_to_num((x + np.float32(1.0)) * np.float32(127.5), nan=0.0, posinf=255.0,
                      neginf=0.0)
    return np.clip(np.round(y), 0.0, 255.0).astype(np.uint8)


def synthetic_dataset(num_examples: int, image_size: int, channels: int,
                      num_classes: int | None, seed: int) -> Dataset:
    """A deterministic labelled dataset with class-dependent structure, for tests and smoke runs.

    Each class has a fixed random low-frequency template; an example is its class template plus
    pixel noise, so a model can learn something and class-conditional code is exercised.
    num_classes None or 0 gives an unlabelled dataset (like CelebA).
    """
    if num_examples < 1 or image_size < 1 or channels < 1:
        raise DataError(
            f"synthetic_dataset: need num_examples, image_size, channels >= 1; got "
            f"{num_examples}, {image_size}, {channels}")
    rng = np.random.default_rng(seed)
    k = num_classes if num_classes else 1
    coarse = max(1, image_size // 4)
    templates = rng.uniform(0.0, 255.0, size=(k, coarse, coarse, channels))
    # Nearest-neighbour upsample to image_size (a smooth-ish template per class).
    idx = np.minimum(np.arange(image_size) * coarse // image_size, coarse - 1)
    templates = templates[:, idx][:, :, idx]
    labels = rng.integers(0, k, size=num_examples)
    noise = rng.normal(0.0, 20.0, size=(num_examples, image_size, image_size, channels))
    images = np.clip(np.rint(templates[labels] + noise), 0, 255).astype(np.uint8)
    if not num_classes:
        return Dataset(images=images, labels=None, num_classes=None, name="synthetic")
    return Dataset(images=images, labels=labels.astype(np.int32), num_classes=int(num_classes),
                   name="synthetic")
