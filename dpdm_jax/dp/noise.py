"""The Gaussian mechanism of DP-SGD: noise once per logical step, public normaliser."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def gaussian_noise_like(tree: PyTree, key: jax.Array, stddev: float | jax.Array) -> PyTree:
    """Independent N(0, stddev^2) noise with the structure, shapes and dtypes of `tree`.

    One draw of d = (number of parameters) normals, cut into the leaves: the same distribution as a
    draw per leaf, but XLA:CPU compiles one random-number generator instead of one per leaf (the
    quickstart network's 193 leaves took 5x longer to compile, benchmarks/noise_compile.py).
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    sizes = [x.size for x in leaves]
    flat = stddev * jax.random.normal(key, (sum(sizes),), jnp.result_type(*leaves))
    offsets = np.cumsum([0] + sizes)
    noise = [flat[lo:hi].reshape(x.shape).astype(x.dtype) for lo, hi, x in zip(offsets[:-1], offsets[1:], leaves)]
    return jax.tree.unflatten(treedef, noise)


def privatise_gradient_sum(
    grad_sum: PyTree,
    key: jax.Array,
    noise_multiplier: float | jax.Array,
    clip_norm: float,
    expected_batch_size: float,
) -> PyTree:
    """(sum of clipped gradients + N(0, sigma^2 C^2 I)) / (q N).

    Args:
      grad_sum: the clipped per-example gradient sum of the WHOLE logical batch.
      key: the step's noise key; must be identical on every device and host (it is: it is
        derived from the run seed and the step), so every replica adds the same noise.
      noise_multiplier: sigma.
      clip_norm: C (the L2 sensitivity of grad_sum).
      expected_batch_size: q * N, public. Never the realised batch size, which is private.
    """
    noise = gaussian_noise_like(grad_sum, key, noise_multiplier * clip_norm)
    return jax.tree.map(lambda g, z: (g + z) / jnp.asarray(expected_batch_size, g.dtype), grad_sum, noise)
