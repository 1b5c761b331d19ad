"""Diffusion parameterisations (method.md section 2) and the preconditioned denoiser.

Every model is a denoiser in variance-exploding form, with x = x0 + sigma * eps,

    D(x; sigma, y) = c_skip(sigma) * x + c_out(sigma) * F_theta(c_in(sigma) * x, c_noise(sigma), y).

Each parameterisation fixes (c_skip, c_out, c_in, c_noise), the training distribution of sigma and the
loss weight w(sigma). For all four, w(sigma) * c_out(sigma)^2 == 1: the loss on the raw network output
F_theta has unit weight at every noise level.

All methods are elementwise over arrays of any shape and work under jit/vmap/grad.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array

# model_apply(params, x_in (B,H,W,C), c_noise (B,), labels (B,) int32 or None) -> (B,H,W,C)
ModelApply = Callable[[Any, Array, Array, Optional[Array]], Array]


@dataclasses.dataclass(frozen=True)
class EDM:
    """Karras et al. (2022) preconditioning with DPDM's sigma_data = sqrt(1/3).

    c_skip = sd^2/(sigma^2+sd^2), c_out = sigma*sd/sqrt(sigma^2+sd^2), c_in = 1/sqrt(sigma^2+sd^2),
    c_noise = ln(sigma)/4; training ln(sigma) ~ N(p_mean, p_std^2); w = (sigma^2+sd^2)/(sigma*sd)^2.
    """

    sigma_data: float = math.sqrt(1.0 / 3.0)
    p_mean: float = -1.2
    p_std: float = 1.2
    name: str = dataclasses.field(default="edm", init=False)

    def preconditioning(self, sigma: Array) -> Tuple[Array, Array, Array, Array]:
        """sigma (...) -> (c_skip, c_out, c_in, c_noise), each shaped like sigma."""
        sigma = jnp.asarray(sigma, jnp.float32)
        sd2 = self.sigma_data**2
        denom = sigma**2 + sd2
        c_skip = sd2 / denom
        c_out = sigma * self.sigma_data * jax.lax.rsqrt(denom)
        c_in = jax.lax.rsqrt(denom)
        c_noise = jnp.log(sigma) / 4.0
        return c_skip, c_out, c_in, c_noise

    def sample_sigma(self, key: Array, shape: Tuple[int, ...] = ()) -> Array:
        """Training noise levels: ln(sigma) ~ N(p_mean, p_std^2). Returns float32 `shape`."""
        return jnp.exp(self.p_mean + self.p_std * jax.random.normal(key, shape, jnp.float32))

    def loss_weight(self, sigma: Array) -> Array:
        """w(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2."""
        sigma = jnp.asarray(sigma, jnp.float32)
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


def v_time(sigma: Array) -> Array:
    """Angle-time of v-prediction: t = (2/pi) * arccos(1/sqrt(1+sigma^2)) = (2/pi) * arctan(sigma).

    The arctan form is the same function and keeps float32 precision at small sigma.
    """
    return (2.0 / jnp.pi) * jnp.arctan(jnp.asarray(sigma, jnp.float32))


def v_time_from_log_snr(log_snr: Array) -> Array:
    """t(lambda) = (2/pi) * arccos(1/sqrt(1+exp(-lambda))); log-SNR lambda = -2 ln(sigma)."""
    return v_time(jnp.exp(-0.5 * jnp.asarray(log_snr, jnp.float32)))


@dataclasses.dataclass(frozen=True)
class VPrediction:
    """v-prediction (Salimans & Ho 2022) in VE form, sigma = tan(pi*t/2).

    c_skip = 1/(sigma^2+1), c_out = sigma/sqrt(sigma^2+1), c_in = 1/sqrt(sigma^2+1), c_noise = t;
    training t ~ U[t(log_snr_max), t(log_snr_min)]; w = (sigma^2+1)/sigma^2.

    With phi = arctan(sigma), c_in * (x0 + sigma*eps) = cos(phi)*x0 + sin(phi)*eps, and with the
    table's sign of c_out the ideal network output is sin(phi)*x0 - cos(phi)*eps, i.e. minus the usual v.
    """

    log_snr_min: float = -9.0
    log_snr_max: float = 13.0
    name: str = dataclasses.field(default="v", init=False)

    def preconditioning(self, sigma: Array) -> Tuple[Array, Array, Array, Array]:
        """sigma (...) -> (c_skip, c_out, c_in, c_noise), each shaped like sigma."""
        sigma = jnp.asarray(sigma, jnp.float32)
        denom = sigma**2 + 1.0
        c_skip = 1.0 / denom
        c_out = sigma * jax.lax.rsqrt(denom)
        c_in = jax.lax.rsqrt(denom)
        return c_skip, c_out, c_in, v_time(sigma)

    def sample_sigma(self, key: Array, shape: Tuple[int, ...] = ()) -> Array:
        """t ~ U[t(lambda_max), t(lambda_min)], sigma = tan(pi*t/2). Returns float32 `shape`."""
        t_lo = v_time_from_log_snr(self.log_snr_max)
        t_hi = v_time_from_log_snr(self.log_snr_min)
        t = jax.random.uniform(key, shape, jnp.float32, t_lo, t_hi)
        return jnp.tan(0.5 * jnp.pi * t)

    def loss_weight(self, sigma: Array) -> Array:
        """w(sigma) = (sigma^2 + 1) / sigma^2."""
        sigma = jnp.asarray(sigma, jnp.float32)
        return (sigma**2 + 1.0) / sigma**2


@dataclasses.dataclass(frozen=True)
class VE:
    """Variance-exploding SDE (Song et al. 2021).

    c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma/2);
    training ln(sigma) ~ U[ln sigma_min, ln sigma_max]; w = 1/sigma^2. Ideal F is -eps.
    """

    sigma_min: float = 0.02
    sigma_max: float = 100.0
    name: str = dataclasses.field(default="ve", init=False)

    def preconditioning(self, sigma: Array) -> Tuple[Array, Array, Array, Array]:
        """sigma (...) -> (c_skip, c_out, c_in, c_noise), each shaped like sigma."""
        sigma = jnp.asarray(sigma, jnp.float32)
        ones = jnp.ones_like(sigma)
        return ones, sigma, ones, jnp.log(0.5 * sigma)

    def sample_sigma(self, key: Array, shape: Tuple[int, ...] = ()) -> Array:
        """ln(sigma) ~ U[ln sigma_min, ln sigma_max]. Returns float32 `shape`."""
        log_sigma = jax.random.uniform(
            key, shape, jnp.float32, math.log(self.sigma_min), math.log(self.sigma_max))
        return jnp.exp(log_sigma)

    def loss_weight(self, sigma: Array) -> Array:
        """w(sigma) = 1/sigma^2."""
        return 1.0 / jnp.asarray(sigma, jnp.float32) ** 2


@dataclasses.dataclass(frozen=True)
class VP:
    """Variance-preserving SDE (Song et al. 2021) in VE form.

    sigma(t) = sqrt(exp(beta_d*t^2/2 + beta_min*t) - 1); c_skip = 1, c_out = -sigma,
    c_in = 1/sqrt(sigma^2+1), c_noise = (M-1)*t(sigma); training t ~ U[eps_t, 1]; w = 1/sigma^2.
    Ideal F is eps.
    """

    beta_min: float = 0.1
    beta_d: float = 19.9
    M: int = 1000
    eps_t: float = 1e-5
    name: str = dataclasses.field(default="vp", init=False)

    def sigma(self, t: Array) -> Array:
        """sigma(t) = sqrt(exp(beta_d*t^2/2 + beta_min*t) - 1), t (...) -> (...)."""
        t = jnp.asarray(t, jnp.float32)
        return jnp.sqrt(jnp.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t))

    def sigma_inv(self, sigma: Array) -> Array:
        """t(sigma), the inverse of `sigma`: root of beta_d/2*t^2 + beta_min*t = ln(1+sigma^2).

        Written as 2L / (sqrt(beta_min^2 + 2*beta_d*L) + beta_min), L = ln(1+sigma^2), which has no
        cancellation at small sigma.
        """
        log1p_s2 = jnp.log1p(jnp.asarray(sigma, jnp.float32) ** 2)
        return 2.0 * log1p_s2 / (jnp.sqrt(self.beta_min**2 + 2.0 * self.beta_d * log1p_s2)
                                 + self.beta_min)

    def preconditioning(self, sigma: Array) -> Tuple[Array, Array, Array, Array]:
        """sigma (...) -> (c_skip, c_out, c_in, c_noise), each shaped like sigma."""
        sigma = jnp.asarray(sigma, jnp.float32)
        c_in = jax.lax.rsqrt(sigma**2 + 1.0)
        return jnp.ones_like(sigma), -sigma, c_in, (self.M - 1) * self.sigma_inv(sigma)

    def sample_sigma(self, key: Array, shape: Tuple[int, ...] = ()) -> Array:
        """t ~ U[eps_t, 1], sigma = sigma(t). Returns float32 `shape`."""
        return self.sigma(jax.random.uniform(key, shape, jnp.float32, self.eps_t, 1.0))

    def loss_weight(self, sigma: Array) -> Array:
        """w(sigma) = 1/sigma^2."""
        return 1.0 / jnp.asarray(sigma, jnp.float32) ** 2


Parameterisation = EDM | VPrediction | VE | VP

_PARAMETERISATIONS = {"edm": EDM, "v": VPrediction, "ve": VE, "vp": VP}
PARAMETERISATIONS = tuple(_PARAMETERISATIONS)  # the registry the config check reads


def get_parameterisation(name: str, **kwargs) -> Parameterisation:
    """Build a parameterisation by name: 'vp', 've', 'v' (v-prediction) or 'edm'.

    kwargs override the dataclass defaults (e.g. get_parameterisation('edm', sigma_data=0.5)).
    """
    try:
        cls = _PARAMETERISATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown parameterisation {name!r}; expected one of {sorted(_PARAMETERISATIONS)}"
        ) from None
    return cls(**kwargs)


def _expand_to(a: Array, ndim: int) -> Array:
    """Append singleton axes to a so that it broadcasts against an array with `ndim` axes."""
    return jnp.reshape(a, a.shape + (1,) * (ndim - a.ndim))


def denoise(model_apply: ModelApply, params: Any, parameterisation: Parameterisation,
            x: Array, sigma: Array, labels: Optional[Array]) -> Array:
    """D(x; sigma, y) = c_skip*x + c_out*F(c_in*x, c_noise, y).

    Args:
      model_apply: F, called as model_apply(params, x_in (B,H,W,C), c_noise (B,), labels (B,) or None).
      params: network parameters (any pytree).
      parameterisation: one of EDM, VPrediction, VE, VP.
      x: noisy images (B,H,W,C), data in [-1, 1] plus sigma-scaled noise.
      sigma: noise levels (B,) (a scalar is broadcast to (B,)).
      labels: int32 class labels (B,), or None for an unconditional model.
    Returns:
      the denoised estimate of x0, (B,H,W,C) float32.
    """
    x = jnp.asarray(x, jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    c_skip, c_out, c_in, c_noise = parameterisation.preconditioning(sigma)
    f = model_apply(params, _expand_to(c_in, x.ndim) * x, c_noise, labels)
    return _expand_to(c_skip, x.ndim) * x + _expand_to(c_out, x.ndim) * f.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _BoundDenoiser:
    """Hashable (model_apply, parameterisation) pair: equal pairs share one jit cache entry."""

    model_apply: ModelApply
    parameterisation: Parameterisation

    def __call__(self, params, x, sigma, labels):
        return denoise(self.model_apply, params, self.parameterisation, x, sigma, labels)


def make_denoise_fn(model_apply: ModelApply, params: Any,
                    parameterisation: Parameterisation) -> jax.tree_util.Partial:
    """Bind a network into denoise_fn(x (B,H,W,C), sigma (B,), labels (B,) or None) -> (B,H,W,C).

    The result is a jax.tree_util.Partial whose leaves are `params`, so a jitted sampler takes the
    weights as an argument: new weights (e.g. successive EMA snapshots) reuse the compiled sampler
    and are never baked into the program as constants.
    """
    return jax.tree_util.Partial(_BoundDenoiser(model_apply, parameterisation), params)
