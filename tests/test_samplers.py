"""Samplers and classifier-free guidance (method.md section 4), driven by closed-form denoisers.

For data with a known law the ideal denoiser D(x; sigma) = E[x0 | x0 + sigma*eps = x] is closed form:
  * Gaussian N(mu, S): D = mu + S (S + sigma^2 I)^-1 (x - mu);
  * a mixture of points p_j with weights pi_j: D = sum_j softmax_j(ln pi_j - |x-p_j|^2/(2 sigma^2)) p_j.
A correct sampler driven by the ideal denoiser reproduces the data law, up to discretisation error.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpdm_jax.diffusion import (EDM, ddim_sample, ddim_stochastic_sample, edm_sample, get_sampler,
                                guided_denoise_fn, make_denoise_fn, sample_images, time_steps)
from dpdm_jax.diffusion.samplers import _ddim

MU = np.array([0.3, -0.2])
COV = np.array([[0.25, 0.1], [0.1, 0.09]])
_LAM, _U = np.linalg.eigh(COV)
POINTS = np.array([[-0.5, -0.5], [0.5, 0.5], [0.5, -0.5]])
WEIGHTS = np.array([0.5, 0.3, 0.2])
SHAPE = (1, 1, 2)  # images of 2 pixels: (H, W, C)


def gaussian_denoiser(x, sigma, labels, mu=MU):
    """mu: (2,) or one mean per row (B, 2)."""
    flat = x.reshape(x.shape[0], -1) - mu
    lam, u = jnp.asarray(_LAM, jnp.float32), jnp.asarray(_U, jnp.float32)
    shrink = lam / (lam + sigma[:, None] ** 2)
    return (jnp.asarray(mu, jnp.float32) + ((flat @ u) * shrink) @ u.T).reshape(x.shape)


def mixture_denoiser(x, sigma, labels):
    flat = x.reshape(x.shape[0], -1)
    pts = jnp.asarray(POINTS, jnp.float32)
    d2 = jnp.sum((flat[:, None, :] - pts[None]) ** 2, -1)
    post = jax.nn.softmax(jnp.log(jnp.asarray(WEIGHTS, jnp.float32)) - d2 / (2 * sigma[:, None] ** 2))
    return (post @ pts).reshape(x.shape)


def _mixture_np(x, t):
    d2 = np.sum((x[:, None, :] - POINTS[None]) ** 2, -1)
    logits = np.log(WEIGHTS) - d2 / (2 * t**2)
    post = np.exp(logits - logits.max(1, keepdims=True))
    return (post / post.sum(1, keepdims=True)) @ POINTS


# ---------------------------------------------------------------------------------------------------
# Grid and configuration

def test_time_steps():
    t = np.asarray(time_steps(7), np.float64)
    i = np.arange(7)
    want = (80 ** (1 / 7) + i / 6 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(t, want, rtol=1e-6)
    assert t[0] == pytest.approx(80.0) and t[-1] == pytest.approx(0.002)
    assert np.all(np.diff(t) < 0)
    with pytest.raises(ValueError, match="num_steps"):
        time_steps(1)
    with pytest.raises(ValueError, match="tmin"):
        time_steps(5, tmin=1.0, tmax=0.5)


def test_get_sampler_names_and_errors():
    for name in ("ddim", "ddim_stochastic", "edm"):
        assert callable(get_sampler(name, num_steps=4))
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("dpm_solver")
    with pytest.raises(ValueError, match="s_churn"):
        get_sampler("ddim", s_churn=1.0)
    with pytest.raises(ValueError, match="num_steps"):
        get_sampler("edm", num_steps=1)
    with pytest.raises(ValueError, match="s_churn"):
        get_sampler("edm", s_churn=-1.0)


# ---------------------------------------------------------------------------------------------------
# Exact update rules against plain float64 loops (nonlinear denoiser, few steps).

def _noises(key, shape, num_steps):
    """The documented key use: init from split(key)[0], step i from fold_in(split(key)[1], i)."""
    k_init, k_loop = jax.random.split(key)
    z0 = np.asarray(jax.random.normal(k_init, shape), np.float64)
    zs = [np.asarray(jax.random.normal(jax.random.fold_in(k_loop, i), shape), np.float64)
          for i in range(num_steps)]
    return z0.reshape(shape[0], -1), [z.reshape(shape[0], -1) for z in zs]


def _reference(kind, z0, zs, n, s_churn=0.0, s_min=0.0, s_max=math.inf):
    t = list((80 ** (1 / 7) + np.arange(n) / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)
    x = t[0] * z0
    if kind in ("ddim", "ddim_stochastic"):
        for i in range(n - 1):
            dt, d = t[i + 1] - t[i], (x - _mixture_np(x, t[i])) / t[i]
            x = x + dt * d if kind == "ddim" else (
                x + 2 * dt * d + np.sqrt(2 * abs(dt) * t[i]) * zs[i])
        return _mixture_np(x, t[-1])
    t.append(0.0)
    for i in range(n):
        gamma = min(s_churn / n, 1.0) if s_min <= t[i] <= s_max else 0.0
        t_hat = t[i] * (1 + gamma)
        x_hat = x + np.sqrt(t_hat**2 - t[i] ** 2) * zs[i]
        d = (x_hat - _mixture_np(x_hat, t_hat)) / t_hat
        x = x_hat + (t[i + 1] - t_hat) * d
        if t[i + 1] > 0:
            d2 = (x - _mixture_np(x, t[i + 1])) / t[i + 1]
            x = x_hat + (t[i + 1] - t_hat) * (d + d2) / 2
    return x


@pytest.mark.parametrize("kind,kwargs", [
    ("ddim", {}), ("ddim_stochastic", {}), ("edm", {}),
    ("edm", dict(s_churn=3.0, s_min=0.01, s_max=10.0)),
], ids=["ddim", "ddim_stochastic", "edm", "edm_churn"])
def test_update_rules_match_reference_loop(kind, kwargs):
    n, shape, key = 6, (64,) + SHAPE, jax.random.PRNGKey(0)
    out = get_sampler(kind, num_steps=n, **kwargs)(mixture_denoiser, key, shape)
    z0, zs = _noises(key, shape, n)
    want = _reference(kind, z0, zs, n, **kwargs)
    np.testing.assert_allclose(np.asarray(out).reshape(64, -1), want, atol=2e-4)


# ---------------------------------------------------------------------------------------------------
# Distributions

CONFIGS = {  # enough steps that the discretisation error is ~1% (computed analytically for N(mu, S))
    "ddim": ("ddim", dict(num_steps=500)),
    "ddim_stochastic": ("ddim_stochastic", dict(num_steps=400)),
    "edm": ("edm", dict(num_steps=100)),
    "edm_churn": ("edm", dict(num_steps=200, s_churn=20.0, s_min=0.05, s_max=50.0)),
}
N = 4000


def _draw(config, denoiser, key):
    name, kwargs = CONFIGS[config]
    x = get_sampler(name, **kwargs)(denoiser, key, (N,) + SHAPE)
    x = np.asarray(x, np.float64).reshape(N, -1)
    assert np.all(np.isfinite(x))
    return x


@pytest.mark.parametrize("config", list(CONFIGS))
def test_gaussian_data_mean_and_covariance(config):
    x = _draw(config, gaussian_denoiser, jax.random.PRNGKey(1))
    sd = np.sqrt(np.diag(COV))
    assert np.all(np.abs(x.mean(0) - MU) < 4 * sd / math.sqrt(N)), x.mean(0)
    # 8% of sd_i*sd_j: ~4 standard errors of a covariance from 4000 samples, plus ~1% bias.
    assert np.all(np.abs(np.cov(x.T) - COV) < 0.08 * np.outer(sd, sd)), np.cov(x.T)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_mixture_data_points_and_weights(config):
    x = _draw(config, mixture_denoiser, jax.random.PRNGKey(2))
    dist = np.linalg.norm(x[:, None, :] - POINTS[None], axis=-1)
    assert np.all(dist.min(1) < 1e-3)  # every sample lands on a data point
    freq = np.bincount(dist.argmin(1), minlength=3) / N
    assert np.all(np.abs(freq - WEIGHTS) < 4 * np.sqrt(WEIGHTS * (1 - WEIGHTS) / N) + 0.01), freq


def test_edm_without_churn_is_deterministic_and_never_sees_sigma_zero():
    def strict(x, sigma, labels):  # NaN if ever called at sigma <= 0
        return jnp.where((sigma > 0)[:, None, None, None], gaussian_denoiser(x, sigma, labels),
                         jnp.nan)

    key = jax.random.PRNGKey(3)
    shape = (16,) + SHAPE
    a = edm_sample(strict, key, shape, num_steps=10, s_churn=0.0, s_min=0.05, s_max=50.0)
    b = edm_sample(strict, key, shape, num_steps=10)
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_array_equal(a, b)  # churn 0: no noise beyond the initial draw
    c = edm_sample(strict, key, shape, num_steps=10, s_churn=5.0)
    assert np.all(np.isfinite(np.asarray(c))) and not np.array_equal(a, c)


# ---------------------------------------------------------------------------------------------------
# Classifier-free guidance

CLASS_MEANS = np.array([[0.5, 0.0], [-0.5, 0.25], [0.0, 0.0]])  # 2 classes, then the null row


def class_denoiser(x, sigma, labels):
    """Class-conditional Gaussian denoiser: class y (or null = 2) has mean CLASS_MEANS[y]."""
    return gaussian_denoiser(x, sigma, None, mu=jnp.asarray(CLASS_MEANS, jnp.float32)[labels])


def test_guidance_formula_and_null_label():
    calls = []

    def label_echo(x, sigma, labels):  # D = label everywhere, so the null label is visible
        calls.append(labels.shape)
        return jnp.broadcast_to(labels[:, None, None, None].astype(jnp.float32), x.shape)

    x = jax.random.normal(jax.random.PRNGKey(4), (3,) + SHAPE)
    labels = jnp.array([0, 1, 1], jnp.int32)
    out = guided_denoise_fn(label_echo, 2.0, num_classes=10)(x, jnp.ones(3), labels)
    np.testing.assert_allclose(out[:, 0, 0, 0], 3.0 * np.array([0, 1, 1]) - 2.0 * 10, rtol=1e-6)
    assert calls == [(6,)]  # one call on 2B rows
    # w = 0 is exactly the conditional denoiser.
    sigma = jnp.array([0.1, 1.0, 10.0])
    unguided = guided_denoise_fn(class_denoiser, 0.0, num_classes=2)(x, sigma, labels)
    np.testing.assert_array_equal(unguided, class_denoiser(x, sigma, labels))
    # General w, for the class-specific means.
    w = 1.5
    guided = guided_denoise_fn(class_denoiser, w, num_classes=2)(x, sigma, labels)
    want = (1 + w) * class_denoiser(x, sigma, labels) - w * class_denoiser(x, sigma, 2 + 0 * labels)
    np.testing.assert_allclose(guided, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        guided_denoise_fn(class_denoiser, w, num_classes=2)(x, sigma, None)


def test_guided_sampling_shifts_the_mean_as_the_formula_says():
    # Same covariance per class => guided D is the Gaussian denoiser with mean (1+w)mu_y - w mu_null.
    w, y, n = 1.0, 0, 2000
    guided = guided_denoise_fn(class_denoiser, w, num_classes=2)
    x = edm_sample(guided, jax.random.PRNGKey(5), (n,) + SHAPE, jnp.full((n,), y), num_steps=60)
    x = np.asarray(x, np.float64).reshape(n, -1)
    want_mu = (1 + w) * CLASS_MEANS[y] - w * CLASS_MEANS[2]
    sd = np.sqrt(np.diag(COV))
    assert np.all(np.abs(x.mean(0) - want_mu) < 4 * sd / math.sqrt(n)), x.mean(0)
    assert np.all(np.abs(np.cov(x.T) - COV) < 0.1 * np.outer(sd, sd))


# ---------------------------------------------------------------------------------------------------
# sample_images

def _label_echo(x, sigma, labels):
    """Image = label/10 + tiny noise-free value: lets the test read back each sample's label."""
    return jnp.broadcast_to((labels[:, None, None, None] / 10.0).astype(jnp.float32), x.shape)


def test_sample_images_batches_labels_and_clipping():
    kwargs = dict(sampler="ddim", sampler_kwargs=dict(num_steps=3))
    images, labels = sample_images(_label_echo, jax.random.PRNGKey(6), 10, 4, SHAPE,
                                   labels=np.arange(10) % 5, num_classes=5, **kwargs)
    assert images.shape == (10,) + SHAPE and images.dtype == np.float32
    np.testing.assert_array_equal(labels, np.arange(10) % 5)
    np.testing.assert_allclose(images[:, 0, 0, 0], labels / 10.0, rtol=1e-6)
    images, labels = sample_images(_label_echo, jax.random.PRNGKey(6), 9, 4, SHAPE,
                                   labels="uniform", num_classes=3, **kwargs)
    assert labels.shape == (9,) and labels.min() >= 0 and labels.max() < 3
    np.testing.assert_allclose(images[:, 0, 0, 0], labels / 10.0, rtol=1e-6)
    images, labels = sample_images(_label_echo, jax.random.PRNGKey(6), 5, 5, SHAPE, labels=2,
                                   num_classes=3, **kwargs)
    np.testing.assert_array_equal(labels, [2] * 5)
    # Guidance inside sample_images: D~ = ((1+w)*y - w*null)/10 with null = num_classes = 10.
    images, labels = sample_images(_label_echo, jax.random.PRNGKey(6), 3, 2, SHAPE, labels=5,
                                   num_classes=10, guidance_weight=0.1, **kwargs)
    np.testing.assert_allclose(images, (1.1 * 5 - 0.1 * 10) / 10, rtol=1e-5)
    # Unconditional, and clipping of out-of-range output to [-1, 1].
    images, labels = sample_images(lambda x, s, y: 5.0 * jnp.ones_like(x), jax.random.PRNGKey(6), 3,
                                   2, SHAPE, **kwargs)
    assert labels is None and np.all(images == 1.0)
    a, _ = sample_images(gaussian_denoiser, jax.random.PRNGKey(7), 6, 4, SHAPE, **kwargs)
    b, _ = sample_images(gaussian_denoiser, jax.random.PRNGKey(7), 6, 4, SHAPE, **kwargs)
    np.testing.assert_array_equal(a, b)
    for bad, match in [(dict(labels="uniform"), "num_classes"), (dict(labels="all"), "uniform"),
                       (dict(labels=np.arange(3), num_classes=5), "shape"),
                       (dict(labels=7, num_classes=5), r"\[0, 5\]"),
                       (dict(labels=None, guidance_weight=1.0), "guidance")]:
        with pytest.raises(ValueError, match=match):
            sample_images(_label_echo, jax.random.PRNGKey(6), 4, 4, SHAPE, **kwargs, **bad)


def test_bound_network_weights_do_not_recompile_the_sampler():
    def model(params, x_in, c_noise, labels):
        return params["scale"] * x_in

    p = EDM()
    shape = (4,) + SHAPE
    key = jax.random.PRNGKey(8)
    first = ddim_sample(make_denoise_fn(model, {"scale": jnp.float32(0.5)}, p), key, shape,
                        num_steps=5)
    size = _ddim._cache_size()
    second = ddim_sample(make_denoise_fn(model, {"scale": jnp.float32(-0.5)}, p), key, shape,
                         num_steps=5)
    assert _ddim._cache_size() == size
    assert not np.array_equal(first, second)
    stoch = ddim_stochastic_sample(make_denoise_fn(model, {"scale": jnp.float32(0.5)}, p), key,
                                   shape, num_steps=5)
    assert np.all(np.isfinite(np.asarray(stoch)))
