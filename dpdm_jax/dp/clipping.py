"""Sum of per-example clipped gradients of any per-example loss.

The engine knows nothing of diffusion: a loss is `loss_fn(params, example, key) -> scalar` for
ONE example (no batch axis). Randomness inside the loss (e.g. DPDM's K noise draws) comes from a
key derived from the step key and the example's dataset index, so an example's gradient does
not depend on how the batch is chunked or sharded.

Per example: g_i = grad loss_fn; clipped to norm <= C over all parameters together (flat
clipping); padding rows and rows with a non-finite loss or gradient contribute exactly zero.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]


class ClipStats(NamedTuple):
    """Sums over the real rows of a batch (sums, so chunks and devices can be added up)."""

    loss_sum: jax.Array  # sum of finite per-example losses
    norm_sum: jax.Array  # sum of finite unclipped gradient norms
    num_clipped: jax.Array  # rows whose norm exceeded C
    num_nonfinite: jax.Array  # rows dropped because loss or gradient was NaN/Inf
    num_examples: jax.Array  # real (unmasked) rows

    @classmethod
    def zeros(cls) -> "ClipStats":
        return cls(*(jnp.zeros((), jnp.float32) for _ in range(5)))

    def __add__(self, other: "ClipStats") -> "ClipStats":  # type: ignore[override]
        return ClipStats(*(a + b for a, b in zip(self, other)))

    def summary(self) -> dict[str, float]:
        """Means over real finite rows (host floats). Statistics of private data: not DP."""
        n = float(self.num_examples)
        finite = max(n - float(self.num_nonfinite), 1.0)
        return {
            "loss": float(self.loss_sum) / finite,
            "grad_norm": float(self.norm_sum) / finite,
            "clipped_fraction": float(self.num_clipped) / max(n, 1.0),
            "nonfinite_fraction": float(self.num_nonfinite) / max(n, 1.0),
            "num_examples": n,
        }


def example_key(key: jax.Array, example_id: jax.Array) -> jax.Array:
    """The PRNG key of one example: a function of the step key and its dataset index only."""
    return jax.random.fold_in(key, example_id)


def noise_multiplicity_loss(draw_loss_fn: Callable, noise_multiplicity: int) -> LossFn:
    """Average a single-draw loss over K independent draws, BEFORE any gradient is taken.

    Args:
      draw_loss_fn: (params, example, key) -> scalar loss of one random draw.
      noise_multiplicity: K >= 1.
    Returns:
      (params, example, key) -> mean over K draws (keys split from `key`).
    """
    if noise_multiplicity < 1:
        raise ValueError(f"noise_multiplicity K must be >= 1, got {noise_multiplicity}")

    def loss_fn(params, example, key):
        keys = jax.random.split(key, noise_multiplicity)
        return jnp.mean(jax.vmap(lambda k: draw_loss_fn(params, example, k))(keys))

    return loss_fn


def clipped_example_grad(loss_fn: LossFn, clip_norm: float, params, example, key, real):
    """Clipped gradient of ONE example (zero if padding or non-finite) and its ClipStats.

    Args: as `clipped_grad_sum`, for a single example (no batch axis); `real` is a bool scalar.
    Returns: (gradient pytree shaped like params, norm <= clip_norm; ClipStats of this example).
    The engine only ever releases sums of these (plus noise); vmap it for per-example analyses.
    """
    loss, grads = jax.value_and_grad(loss_fn)(params, example, key)
    norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(norm)
    keep = real & finite
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
    # jnp.where, not multiplication by 0: 0 * NaN is NaN.
    clipped = jax.tree.map(lambda g: jnp.where(keep, g * scale.astype(g.dtype), jnp.zeros_like(g)), grads)
    real_f = real.astype(jnp.float32)
    stats = ClipStats(
        loss_sum=jnp.where(keep, loss, 0.0).astype(jnp.float32),
        norm_sum=jnp.where(keep, norm, 0.0).astype(jnp.float32),
        num_clipped=(keep & (norm > clip_norm)).astype(jnp.float32),
        num_nonfinite=(real & ~finite).astype(jnp.float32),
        num_examples=real_f,
    )
    return clipped, stats


def clipped_grad_sum(
    loss_fn: LossFn,
    params: PyTree,
    examples: PyTree,
    example_ids: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    clip_norm: float,
    microbatch_size: int | None = None,
) -> tuple[PyTree, ClipStats]:
    """Sum over examples of per-example gradients clipped to L2 norm <= clip_norm.

    Args:
      loss_fn: per-example loss (params, example, key) -> scalar.
      params: parameter pytree (the gradient has its structure).
      examples: pytree whose leaves have a leading batch axis B.
      example_ids: int32 (B,) dataset indices (keys are derived from them).
      mask: bool (B,) True for real rows; False rows contribute exactly zero.
      key: step key, identical on every device.
      clip_norm: C > 0.
      microbatch_size: if set, examples are processed `microbatch_size` at a time with
        lax.scan (bounds memory: only that many per-example gradients live at once).
    Returns:
      (sum of clipped gradients, ClipStats of sums over real rows).
    """
    batch = example_ids.shape[0]
    keys = jax.vmap(lambda i: example_key(key, i))(example_ids)
    per_example = jax.vmap(lambda ex, k, m: clipped_example_grad(loss_fn, clip_norm, params, ex, k, m))

    def reduce(ex, k, m):
        clipped, stats = per_example(ex, k, m)
        return jax.tree.map(lambda g: g.sum(0), clipped), jax.tree.map(lambda s: s.sum(0), stats)

    if microbatch_size is None or microbatch_size >= batch:
        return reduce(examples, keys, mask)
    if batch % microbatch_size:
        raise ValueError(f"batch size {batch} must be a multiple of microbatch_size {microbatch_size}")
    split = lambda x: x.reshape((batch // microbatch_size, microbatch_size) + x.shape[1:])
    xs = (jax.tree.map(split, examples), split(keys), split(mask))

    def body(carry, x):
        g, s = reduce(*x)
        return jax.tree.map(jnp.add, carry, (g, s)), None

    # The carry must have the body's type: inside shard_map params and mask are device-varying,
    # so zeros built from them are too (ClipStats.zeros() would be device-invariant).
    zero = jnp.zeros_like(mask[0], jnp.float32)
    init = (jax.tree.map(jnp.zeros_like, params), ClipStats(*(zero for _ in ClipStats._fields)))
    (grad_sum, stats), _ = jax.lax.scan(body, init, xs)
    return grad_sum, stats
