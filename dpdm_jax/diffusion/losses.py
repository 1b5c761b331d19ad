"""The per-example DPDM denoising loss with noise multiplicity (method.md section 1, steps 2-3).

For ONE example (x, y):
  * label dropout, decided once: with probability `label_dropout`, y := num_classes (the null label);
  * K = noise_multiplicity independent draws (sigma_k, eps_k) from the parameterisation's training law;
  * l = mean_{k,c,h,w} w(sigma_k) * (D(x + sigma_k*eps_k; sigma_k, y) - x)^2, with the network called
    once on a batch of K rows that all carry the same label.

The DP engine differentiates l per example (jax.vmap(jax.grad(loss_fn))) and clips: because the K
draws are averaged inside l, each example's gradient has sensitivity C whatever K is.

Key use inside loss_fn (fixed, so that tests can reproduce the draws):
  k_drop, k_noise = jax.random.split(key)
  label = drop_label(k_drop, label, num_classes, label_dropout)
  sigma, eps = draw_noise(parameterisation, k_noise, K, image.shape)
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from dpdm_jax.diffusion.parameterisations import ModelApply, Parameterisation, denoise

Array = jax.Array


def draw_noise(parameterisation: Parameterisation, key: Array, num_draws: int,
               image_shape: Tuple[int, ...]) -> Tuple[Array, Array]:
    """K independent pairs (sigma_k, eps_k) for one example.

    Draw k depends only on jax.random.split(key, num_draws)[k]: its key is split into
    (k_sigma, k_eps), sigma_k = parameterisation.sample_sigma(k_sigma, ()) and
    eps_k = N(0, I) of shape image_shape from k_eps.

    Returns:
      sigma (K,) float32 and eps (K, *image_shape) float32.
    """
    def one(k):
        k_sigma, k_eps = jax.random.split(k)
        return (parameterisation.sample_sigma(k_sigma, ()),
                jax.random.normal(k_eps, tuple(image_shape), jnp.float32))

    return jax.vmap(one)(jax.random.split(key, num_draws))


def drop_label(key: Array, label: Array, num_classes: int, label_dropout: float) -> Array:
    """With probability label_dropout return num_classes (the null label), else label. int32 scalar."""
    drop = jax.random.bernoulli(key, label_dropout)
    return jnp.where(drop, jnp.int32(num_classes), jnp.asarray(label, jnp.int32))


def denoising_loss(model_apply: ModelApply, params: Any, parameterisation: Parameterisation,
                   image: Array, label: Optional[Array], sigma: Array, eps: Array) -> Array:
    """mean_{k,c,h,w} w(sigma_k) * (D(x + sigma_k*eps_k; sigma_k, y) - x)^2 for given draws.

    Args:
      image: the clean example x, (H,W,C) float32 in [-1, 1].
      label: int32 scalar, already after label dropout, or None (unconditional).
      sigma: (K,) noise levels; eps: (K,H,W,C) standard normal noise.
    Returns:
      scalar float32. The network is called once, on a batch of K rows with identical labels.
    """
    x0 = jnp.asarray(image, jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32)
    num_draws = sigma.shape[0]
    x_noisy = x0[None] + sigma[:, None, None, None] * eps
    labels = None if label is None else jnp.full((num_draws,), label, jnp.int32)
    d = denoise(model_apply, params, parameterisation, x_noisy, sigma, labels)
    weight = parameterisation.loss_weight(sigma)[:, None, None, None]
    return jnp.mean(weight * (d - x0[None]) ** 2).astype(jnp.float32)


def make_per_example_loss(model_apply: ModelApply, parameterisation: Parameterisation,
                          noise_multiplicity: int, num_classes: Optional[int],
                          label_dropout: float = 0.1
                          ) -> Callable[[Any, Mapping[str, Array], Array], Array]:
    """Build loss_fn(params, example, key) -> scalar float32 for ONE (unbatched) example.

    Args:
      model_apply: F, model_apply(params, x_in (K,H,W,C), c_noise (K,), labels (K,) int32 or None).
      parameterisation: one of the objects of `parameterisations.get_parameterisation`.
      noise_multiplicity: K >= 1, number of (sigma, eps) draws averaged per example.
      num_classes: number of classes of a class-conditional model (null label = num_classes),
        or None for an unconditional model (example['label'] is then ignored and may be absent).
      label_dropout: probability in [0, 1) of replacing the label by the null label.
    Returns:
      loss_fn(params, example, key), example = {'image': (H,W,C) float32, 'label': int32 scalar}.
      Meant to be used as jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0)) over examples and keys.
    """
    if isinstance(noise_multiplicity, bool) or int(noise_multiplicity) != noise_multiplicity \
            or noise_multiplicity < 1:
        raise ValueError(f"noise_multiplicity must be an integer >= 1, got {noise_multiplicity!r}")
    noise_multiplicity = int(noise_multiplicity)
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout!r}")
    if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")

    def loss_fn(params: Any, example: Mapping[str, Array], key: Array) -> Array:
        image = jnp.asarray(example["image"], jnp.float32)
        k_drop, k_noise = jax.random.split(key)
        if num_classes is None:
            label = None
        else:
            label = drop_label(k_drop, example["label"], num_classes, label_dropout)
        sigma, eps = draw_noise(parameterisation, k_noise, noise_multiplicity, image.shape)
        return denoising_loss(model_apply, params, parameterisation, image, label, sigma, eps)

    return loss_fn
