"""Samplers for VE-form denoisers (method.md section 4) and classifier-free guidance.

A denoiser is any `denoise_fn(x (B,H,W,C), sigma (B,), labels (B,) int32 or None) -> (B,H,W,C)`
(see `parameterisations.make_denoise_fn`). Samplers integrate from x = t_0 * z along the time grid

    t_i = (tmax^(1/rho) + i/(N-1) * (tmin^(1/rho) - tmax^(1/rho)))^rho,   i = 0..N-1,

inside one jitted lax.fori_loop. A denoise_fn that is a jax.tree_util.Partial (as `make_denoise_fn`
returns) is passed to the compiled sampler as an argument, so its weights are not baked in and new
weights reuse the compiled program; a plain function is wrapped as a leafless Partial (its identity is
then part of the jit cache key).

Randomness: the initial noise uses split(key)[0]; step i's noise uses fold_in(split(key)[1], i).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
from typing import Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

Array = jax.Array
DenoiseFn = Callable[[Array, Array, Optional[Array]], Array]

TMIN, TMAX, RHO = 0.002, 80.0, 7.0


def time_steps(num_steps: int, tmin: float = TMIN, tmax: float = TMAX, rho: float = RHO) -> Array:
    """The rho-spaced grid t_0 = tmax > ... > t_{N-1} = tmin, (N,) float32 (computed in float64)."""
    _check_grid(num_steps, tmin, tmax, rho)
    return jnp.asarray(_grid_np(num_steps, tmin, tmax, rho))


def _grid_np(num_steps, tmin, tmax, rho) -> np.ndarray:
    frac = np.arange(num_steps, dtype=np.float64) / (num_steps - 1)
    lo, hi = tmin ** (1.0 / rho), tmax ** (1.0 / rho)
    return ((hi + frac * (lo - hi)) ** rho).astype(np.float32)


def _check_grid(num_steps, tmin, tmax, rho):
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
    if not 0.0 < tmin < tmax:
        raise ValueError(f"need 0 < tmin < tmax, got tmin={tmin!r}, tmax={tmax!r}")
    if not rho > 0.0:
        raise ValueError(f"rho must be > 0, got {rho!r}")


def _check_churn(s_churn, s_noise):
    if s_churn < 0.0 or s_noise < 0.0:
        raise ValueError(f"need s_churn >= 0 and s_noise >= 0, got {s_churn!r}, {s_noise!r}")


def _as_partial(denoise_fn: DenoiseFn) -> jax.tree_util.Partial:
    if isinstance(denoise_fn, jax.tree_util.Partial):
        return denoise_fn
    return jax.tree_util.Partial(denoise_fn)


def _denoise_at(denoise_fn, x, t, labels):
    """D(x; t) with the scalar time t broadcast to the batch (B,)."""
    return denoise_fn(x, jnp.full(x.shape[:1], t, jnp.float32), labels).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------
# DDIM: Euler (deterministic) or Euler-Maruyama (stochastic) on the VE probability flow / reverse SDE.

@functools.partial(jax.jit, static_argnames=("shape", "num_steps", "tmin", "tmax", "rho",
                                             "stochastic"))
def _ddim(denoise_fn, key, labels, *, shape, num_steps, tmin, tmax, rho, stochastic):
    t = jnp.asarray(_grid_np(num_steps, tmin, tmax, rho))
    k_init, k_loop = jax.random.split(key)
    x = t[0] * jax.random.normal(k_init, shape, jnp.float32)

    def body(i, x):
        t_cur, t_next = t[i], t[i + 1]
        dt = t_next - t_cur
        d = (x - _denoise_at(denoise_fn, x, t_cur, labels)) / t_cur
        if not stochastic:
            return x + dt * d
        z = jax.random.normal(jax.random.fold_in(k_loop, i), shape, jnp.float32)
        return x + 2.0 * dt * d + jnp.sqrt(2.0 * jnp.abs(dt) * t_cur) * z

    x = jax.lax.fori_loop(0, num_steps - 1, body, x)
    return _denoise_at(denoise_fn, x, t[num_steps - 1], labels)


def ddim_sample(denoise_fn: DenoiseFn, key: Array, shape: Sequence[int],
                labels: Optional[Array] = None, *, num_steps: int = 50, tmin: float = TMIN,
                tmax: float = TMAX, rho: float = RHO) -> Array:
    """Deterministic DDIM = Euler on the probability-flow ODE dx/dt = (x - D(x; t)) / t.

    x <- x + (t_{i+1} - t_i) * (x - D(x; t_i)) / t_i for i = 0..N-2, then x <- D(x; tmin).
    Uses N denoiser calls. Args: shape (B,H,W,C); labels (B,) int32 or None. Returns (B,H,W,C).
    """
    _check_grid(num_steps, tmin, tmax, rho)
    return _ddim(_as_partial(denoise_fn), key, labels, shape=tuple(shape), num_steps=int(num_steps),
                 tmin=float(tmin), tmax=float(tmax), rho=float(rho), stochastic=False)


def ddim_stochastic_sample(denoise_fn: DenoiseFn, key: Array, shape: Sequence[int],
                           labels: Optional[Array] = None, *, num_steps: int = 50,
                           tmin: float = TMIN, tmax: float = TMAX, rho: float = RHO) -> Array:
    """Stochastic DDIM = Euler-Maruyama on the reverse SDE of the VE process sigma(t) = t.

    With dt = t_{i+1} - t_i < 0: x <- x + 2*dt*(x - D(x; t_i))/t_i, then x <- x + sqrt(2*|dt|*t_i)*z,
    for i = 0..N-2; finally x <- D(x; tmin). Args/returns as `ddim_sample`.
    """
    _check_grid(num_steps, tmin, tmax, rho)
    return _ddim(_as_partial(denoise_fn), key, labels, shape=tuple(shape), num_steps=int(num_steps),
                 tmin=float(tmin), tmax=float(tmax), rho=float(rho), stochastic=True)


# ---------------------------------------------------------------------------------------------------
# EDM: Heun (2nd order) with optional churn.

def churn_gammas(num_steps: int, t: np.ndarray, s_churn: float, s_min: float,
                 s_max: float) -> np.ndarray:
    """gamma_i = min(s_churn/N, 1) where s_min <= t_i <= s_max, else 0. (N,) float64 numpy."""
    t = np.asarray(t, np.float64)
    inside = (t >= s_min) & (t <= s_max)
    return np.where(inside, min(s_churn / num_steps, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("shape", "num_steps", "tmin", "tmax", "rho", "s_churn",
                                             "s_min", "s_max", "s_noise"))
def _edm(denoise_fn, key, labels, *, shape, num_steps, tmin, tmax, rho, s_churn, s_min, s_max,
         s_noise):
    t_np = _grid_np(num_steps, tmin, tmax, rho)
    t = jnp.asarray(t_np)
    gammas_np = churn_gammas(num_steps, t_np, s_churn, s_min, s_max)  # static schedule
    churn = bool(np.any(gammas_np > 0.0)) and s_noise > 0.0
    gammas = jnp.asarray(gammas_np, jnp.float32)
    k_init, k_loop = jax.random.split(key)
    x = t[0] * jax.random.normal(k_init, shape, jnp.float32)

    def add_churn(i, x):
        """x_hat = x + s_noise*sqrt(t_hat^2 - t_i^2)*z at t_hat = t_i*(1+gamma_i)."""
        t_cur = t[i]
        t_hat = t_cur * (1.0 + gammas[i])
        if not churn:  # no noise is drawn at all: the sampler is deterministic
            return x, t_hat
        z = jax.random.normal(jax.random.fold_in(k_loop, i), shape, jnp.float32)
        return x + s_noise * jnp.sqrt(jnp.maximum(t_hat**2 - t_cur**2, 0.0)) * z, t_hat

    def heun_step(i, x):
        x_hat, t_hat = add_churn(i, x)
        t_next = t[i + 1]  # > 0 for i <= N-2
        d = (x_hat - _denoise_at(denoise_fn, x_hat, t_hat, labels)) / t_hat
        x_euler = x_hat + (t_next - t_hat) * d
        d_next = (x_euler - _denoise_at(denoise_fn, x_euler, t_next, labels)) / t_next
        return x_hat + (t_next - t_hat) * 0.5 * (d + d_next)

    x = jax.lax.fori_loop(0, num_steps - 1, heun_step, x)
    # Last step to the appended t_N = 0: Euler only, x_hat + (0 - t_hat)*(x_hat - D)/t_hat = D.
    x_hat, t_hat = add_churn(num_steps - 1, x)
    return _denoise_at(denoise_fn, x_hat, t_hat, labels)


def edm_sample(denoise_fn: DenoiseFn, key: Array, shape: Sequence[int],
               labels: Optional[Array] = None, *, num_steps: int = 50, tmin: float = TMIN,
               tmax: float = TMAX, rho: float = RHO, s_churn: float = 0.0, s_min: float = 0.0,
               s_max: float = math.inf, s_noise: float = 1.0) -> Array:
    """EDM sampler: Heun's method on the probability-flow ODE with stochastic churn.

    The grid t_0..t_{N-1} is extended by t_N = 0. At step i: gamma_i = min(s_churn/N, 1) if
    s_min <= t_i <= s_max else 0; t_hat = t_i*(1+gamma_i); x_hat = x + s_noise*sqrt(t_hat^2-t_i^2)*z;
    Euler step to t_{i+1}, then the Heun (trapezoidal) correction when t_{i+1} > 0. Uses 2N-1 denoiser
    calls. With s_churn = 0 no noise is drawn after the initial x = t_0*z.
    Args: shape (B,H,W,C); labels (B,) int32 or None. Returns (B,H,W,C).
    """
    _check_grid(num_steps, tmin, tmax, rho)
    _check_churn(s_churn, s_noise)
    return _edm(_as_partial(denoise_fn), key, labels, shape=tuple(shape), num_steps=int(num_steps),
                tmin=float(tmin), tmax=float(tmax), rho=float(rho), s_churn=float(s_churn),
                s_min=float(s_min), s_max=float(s_max), s_noise=float(s_noise))


_SAMPLERS = {"ddim": ddim_sample, "ddim_stochastic": ddim_stochastic_sample, "edm": edm_sample}
SAMPLERS = tuple(_SAMPLERS)  # the image samplers, by name (the registry the config check reads)


def get_sampler(name: str, **kwargs) -> Callable[..., Array]:
    """sampler(denoise_fn, key, shape, labels=None) -> x for 'ddim', 'ddim_stochastic' or 'edm'.

    kwargs are the sampler's keyword options (num_steps, tmin, tmax, rho; for 'edm' also s_churn,
    s_min, s_max, s_noise); unknown names or invalid values raise ValueError here.
    """
    try:
        fn = _SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(_SAMPLERS)}") from None
    defaults = {p.name: p.default for p in inspect.signature(fn).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"sampler {name!r} has no option(s) {unknown}; options: {list(defaults)}")
    cfg = {**defaults, **kwargs}
    _check_grid(cfg["num_steps"], cfg["tmin"], cfg["tmax"], cfg["rho"])
    if name == "edm":
        _check_churn(cfg["s_churn"], cfg["s_noise"])
    return functools.partial(fn, **kwargs)


def resolve_labels(spec, num_samples: int, num_classes: int | None):
    """The labels of `num_samples` images: the one reading of `sampling.labels` (config check, sample, eval).

    'balanced' -> 0, 1, .., C-1, 0, 1, ..; 'uniform' (drawn by sample_images); a class index (an
    int or a string of digits) in [0, C); None for an unconditional model (num_classes None), after
    the same check of the spec (an index must then be >= 0).
    """
    if spec not in ("balanced", "uniform"):
        label = int(spec) if isinstance(spec, str) and spec.strip().isdigit() else spec
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) or label < 0 or (
                num_classes is not None and label >= num_classes):
            raise ValueError(f"sampling.labels must be 'balanced', 'uniform' or a class index in "
                             f"[0, {num_classes}), got {spec!r}")
        spec = int(label)
    if num_classes is None:
        return None
    if spec == "balanced":
        return np.arange(num_samples, dtype=np.int32) % num_classes
    return spec


# ---------------------------------------------------------------------------------------------------
# Classifier-free guidance and batched sampling.

@dataclasses.dataclass(frozen=True)
class _Guided:
    num_classes: int

    def __call__(self, denoise_fn, guidance_weight, x, sigma, labels):
        if labels is None:
            raise ValueError("classifier-free guidance needs class labels")
        batch = x.shape[0]
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,))
        labels = jnp.asarray(labels, jnp.int32)
        null = jnp.full_like(labels, self.num_classes)
        d = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]),
                       jnp.concatenate([labels, null])).astype(jnp.float32)
        d_cond, d_null = d[:batch], d[batch:]
        return (1.0 + guidance_weight) * d_cond - guidance_weight * d_null


def guided_denoise_fn(denoise_fn: DenoiseFn, guidance_weight: float,
                      num_classes: int) -> jax.tree_util.Partial:
    """Classifier-free guidance: D~(x; sigma, y) = (1+w)*D(x; sigma, y) - w*D(x; sigma, null).

    The null label is num_classes. Both terms come from ONE call of denoise_fn on a batch of 2B rows
    (the B conditional rows first). Returns a denoise_fn with the same signature; labels must not be
    None. w is a leaf of the returned Partial, so changing it does not recompile a jitted sampler.
    """
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return jax.tree_util.Partial(_Guided(int(num_classes)), _as_partial(denoise_fn),
                                 jnp.asarray(guidance_weight, jnp.float32))


def _resolve_labels(labels, num_samples, num_classes, key) -> Optional[np.ndarray]:
    """None | 'uniform' | int | array (N,) -> None or int32 numpy (N,) with values in [0, num_classes]."""
    if labels is None:
        return None
    if isinstance(labels, str):
        if labels != "uniform":
            raise ValueError(f"labels must be None, 'uniform', an int or an array, got {labels!r}")
        if num_classes is None:
            raise ValueError("labels='uniform' needs num_classes")
        return np.asarray(jax.random.randint(key, (num_samples,), 0, num_classes), np.int32)
    out = np.asarray(labels)
    if not np.issubdtype(out.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {out.dtype}")
    if out.ndim == 0:
        out = np.full((num_samples,), out)
    if out.shape != (num_samples,):
        raise ValueError(f"labels must have shape ({num_samples},), got {out.shape}")
    if num_classes is not None and (out.min() < 0 or out.max() > num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}] ({num_classes} = null label)")
    return out.astype(np.int32)


def sample_images(denoise_fn: DenoiseFn, key: Array, num_samples: int, batch_size: int,
                  image_shape: Sequence[int], sampler: Union[str, Callable[..., Array]] = "ddim",
                  sampler_kwargs: Optional[dict] = None,
                  labels: Union[None, str, int, np.ndarray, Array] = None,
                  num_classes: Optional[int] = None,
                  guidance_weight: float = 0.0) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Draw num_samples images in batches of batch_size (the last batch is padded, then cut).

    Args:
      denoise_fn: D(x (B,H,W,C), sigma (B,), labels (B,) or None) -> (B,H,W,C).
      key: PRNG key; split into (k_labels, k_sample), batch b samples with fold_in(k_sample, b).
      image_shape: (H, W, C).
      sampler: 'ddim' | 'ddim_stochastic' | 'edm' (configured by sampler_kwargs) or a callable
        sampler(denoise_fn, key, shape, labels) such as get_sampler(...) returns.
      labels: None (unconditional), 'uniform' (i.i.d. uniform over num_classes classes), an int
        (every sample of that class) or an int array (N,). num_classes (the null label) is allowed.
      num_classes: number of classes; needed for 'uniform', for guidance and for range checks.
      guidance_weight: w of classifier-free guidance; 0 samples the conditional model unguided.
    Returns:
      images float32 numpy (N,H,W,C) clipped to [-1, 1], and labels int32 numpy (N,) or None.
    """
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(sampler, str):
        sampler = get_sampler(sampler, **(sampler_kwargs or {}))
    elif sampler_kwargs:
        raise ValueError("sampler_kwargs apply only when sampler is given by name")
    k_labels, k_sample = jax.random.split(key)
    label_array = _resolve_labels(labels, num_samples, num_classes, k_labels)
    if guidance_weight != 0.0:
        if label_array is None or num_classes is None:
            raise ValueError("guidance needs labels and num_classes")
        denoise_fn = guided_denoise_fn(denoise_fn, guidance_weight, num_classes)

    num_batches = -(-num_samples // batch_size)
    if label_array is not None:
        padded = np.resize(label_array, num_batches * batch_size)  # pads by repetition
    shape = (batch_size,) + tuple(image_shape)
    outputs, pending = [], None
    for b in range(num_batches):
        batch_labels = None if label_array is None else jnp.asarray(
            padded[b * batch_size:(b + 1) * batch_size])
        x = jnp.clip(sampler(denoise_fn, jax.random.fold_in(k_sample, b), shape, batch_labels),
                     -1.0, 1.0)
        if pending is not None:  # fetch the previous batch while this one runs
            outputs.append(np.asarray(pending))
            logging.info("sampled %d/%d images", len(outputs) * batch_size, num_samples)
        pending = x
    outputs.append(np.asarray(pending))
    images = np.concatenate(outputs)[:num_samples].astype(np.float32)
    return images, label_array
