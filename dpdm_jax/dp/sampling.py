"""Poisson subsampling on the host, cut into fixed-size padded chunks.

Every example is in the logical batch independently with probability q, so the batch size is
random (Binomial(N, q)). The batch is processed in chunks of a fixed size (a multiple of the
device count, so shapes are static and compile once); the last chunk is padded and masked.
Nothing is ever truncated: the number of chunks varies from step to step instead.

The draw for a step depends only on (seed, step), so a resumed run replays the same batches.
The seed is SECRET and is an argument of each call, never a field (a repr would print it); the
sampler's fields are public, as jax_privacy's batch selection keeps them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np



def expected_batch_size(sampling_rate: float, dataset_size: int) -> float:
    """q * N, the expected size of a Poisson batch: the one definition (plan, ledger, sampler, step)."""
    return sampling_rate * dataset_size


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One fixed-size piece of a logical batch.

    Attributes:
      indices: int32 (chunk_size,) dataset indices; padding rows hold 0.
      mask: bool (chunk_size,) True for real examples, False for padding.
    """

    indices: np.ndarray
    mask: np.ndarray

    @property
    def num_real(self) -> int:
        return int(self.mask.sum())


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
    """Stateless Poisson sampler: `batch_indices(seed, step)` is a pure function of (seed, step).

    Attributes:
      dataset_size: N, public.
      sampling_rate: q in (0, 1].
      chunk_size: rows per chunk (physical batch); a multiple of `num_devices`.
      num_devices: devices the chunk is split over (chunk_size must divide evenly).
    """

    dataset_size: int
    sampling_rate: float
    chunk_size: int
    num_devices: int = 1

    def __post_init__(self):
        if self.dataset_size < 1:
            raise ValueError(f"dataset_size must be >= 1, got {self.dataset_size}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if self.chunk_size < 1 or self.num_devices < 1:
            raise ValueError("chunk_size and num_devices must be >= 1")
        if self.chunk_size % self.num_devices:
            raise ValueError(
                f"chunk_size={self.chunk_size} must be a multiple of the device count {self.num_devices}"
            )

    @property
    def expected_batch_size(self) -> float:
        return expected_batch_size(self.sampling_rate, self.dataset_size)

    def batch_indices(self, seed: int, step: int) -> np.ndarray:
        """Sorted int64 indices of the examples in logical batch `step` (any size, maybe 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rng = np.random.default_rng([seed, step])
        return np.flatnonzero(rng.random(self.dataset_size) < self.sampling_rate)

    def num_chunks(self, batch_size: int) -> int:
        return math.ceil(batch_size / self.chunk_size)

    def chunks(self, seed: int, step: int) -> list[Chunk]:
        """The logical batch of `step` cut into padded, masked chunks (an empty list if empty)."""
        return list(self.iter_chunks(seed, step))

    def iter_chunks(self, seed: int, step: int) -> Iterator[Chunk]:
        indices = self.batch_indices(seed, step)
        for start in range(0, len(indices), self.chunk_size):
            part = indices[start : start + self.chunk_size]
            padded = np.zeros(self.chunk_size, np.int32)
            padded[: len(part)] = part
            mask = np.zeros(self.chunk_size, bool)
            mask[: len(part)] = True
            yield Chunk(indices=padded, mask=mask)
