"""Parameterisations (method.md section 2), the denoiser and the per-example DPDM loss (section 1)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dpdm_jax.diffusion import (EDM, VE, VP, VPrediction, denoise, denoising_loss, draw_noise,
                                drop_label, get_parameterisation, make_denoise_fn,
                                make_per_example_loss)

SIGMAS = np.array([0.002, 0.01, 0.1, 0.5, 1.0, 3.0, 20.0, 80.0])
ALL = [EDM(), VPrediction(), VE(), VP()]
IDS = ["edm", "v", "ve", "vp"]


def _zero_model(params, x, c_noise, labels):
    return jnp.zeros_like(x)


def _toy_model(params, x, c_noise, labels):
    """A tiny nonlinear network F(x_in, c_noise, y) that uses every input."""
    h = jnp.tanh(x @ params["w"] + params["b"] + params["a"] * c_noise[:, None, None, None])
    if labels is not None:
        h = h + params["emb"][labels][:, None, None, :]
    return h


def _toy_params(key, channels=2, num_classes=3):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w": jax.random.normal(k1, (channels, channels)), "b": jax.random.normal(k2, (channels,)),
            "a": jnp.float32(0.3), "emb": jax.random.normal(k3, (num_classes + 1, channels))}


# ---------------------------------------------------------------------------------------------------
# Parameterisations

def test_get_parameterisation_names_and_errors():
    assert isinstance(get_parameterisation("edm"), EDM)
    assert isinstance(get_parameterisation("v"), VPrediction)
    assert isinstance(get_parameterisation("ve"), VE)
    assert isinstance(get_parameterisation("vp"), VP)
    assert get_parameterisation("edm").sigma_data == pytest.approx(math.sqrt(1 / 3))
    assert get_parameterisation("edm", sigma_data=0.5).sigma_data == 0.5
    assert (VP().beta_min, VP().beta_d, VP().M, VP().eps_t) == (0.1, 19.9, 1000, 1e-5)
    assert (VE().sigma_min, VE().sigma_max) == (0.02, 100.0)
    assert (VPrediction().log_snr_min, VPrediction().log_snr_max) == (-9.0, 13.0)
    with pytest.raises(ValueError, match="unknown parameterisation"):
        get_parameterisation("ddpm")


def _table(name, s):
    """method.md's table in float64 numpy, written independently of the implementation."""
    if name == "edm":
        sd = math.sqrt(1 / 3)
        return (sd**2 / (s**2 + sd**2), s * sd / np.sqrt(s**2 + sd**2), 1 / np.sqrt(s**2 + sd**2),
                np.log(s) / 4, (s**2 + sd**2) / (s * sd) ** 2)
    if name == "v":
        return (1 / (s**2 + 1), s / np.sqrt(s**2 + 1), 1 / np.sqrt(s**2 + 1),
                2 / np.pi * np.arccos(1 / np.sqrt(1 + s**2)), (s**2 + 1) / s**2)
    if name == "ve":
        return np.ones_like(s), s, np.ones_like(s), np.log(s / 2), 1 / s**2
    # vp: invert sigma(t) numerically on a fine float64 grid, then interpolate.
    tt = np.linspace(0, 1.2, 2_000_001)
    st = np.sqrt(np.expm1(19.9 * tt**2 / 2 + 0.1 * tt))
    t = np.interp(s, st, tt)
    return np.ones_like(s), -s, 1 / np.sqrt(s**2 + 1), 999 * t, 1 / s**2


@pytest.mark.parametrize("p,name", list(zip(ALL, IDS)), ids=IDS)
def test_preconditioning_and_weight_match_table(p, name):
    got = [np.asarray(a, np.float64) for a in p.preconditioning(jnp.asarray(SIGMAS))]
    got.append(np.asarray(p.loss_weight(jnp.asarray(SIGMAS)), np.float64))
    for g, want in zip(got, _table(name, SIGMAS)):
        np.testing.assert_allclose(g, want, rtol=2e-5, atol=1e-6)
    # Every parameterisation puts unit weight on the raw network output: w * c_out^2 == 1.
    np.testing.assert_allclose(got[4] * got[1] ** 2, 1.0, rtol=1e-5)


def test_edm_zero_network_returns_c_skip_x():
    p = EDM()
    x = jax.random.normal(jax.random.PRNGKey(0), (len(SIGMAS), 3, 3, 2))
    out = denoise(_zero_model, None, p, x, jnp.asarray(SIGMAS), None)
    sd2 = 1 / 3
    want = np.asarray(x) * (sd2 / (SIGMAS**2 + sd2))[:, None, None, None]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-7)


def test_v_prediction_is_an_angle():
    """c_in*(x0 + sigma*eps) = cos(phi)*x0 + sin(phi)*eps with phi = arctan(sigma) = pi/2 * c_noise,
    and the ideal network output sin(phi)*x0 - cos(phi)*eps (minus v) makes D return x0."""
    p = VPrediction()
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x0 = jax.random.uniform(k1, (len(SIGMAS), 4, 4, 1), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    sig = jnp.asarray(SIGMAS, jnp.float32)[:, None, None, None]
    c_skip, c_out, c_in, c_noise = p.preconditioning(jnp.asarray(SIGMAS))
    phi = np.arctan(SIGMAS)
    np.testing.assert_allclose(np.pi / 2 * np.asarray(c_noise), phi, rtol=1e-5)
    cos, sin = np.cos(phi)[:, None, None, None], np.sin(phi)[:, None, None, None]
    x = x0 + sig * eps
    np.testing.assert_allclose(c_in[:, None, None, None] * x, cos * x0 + sin * eps,
                               rtol=1e-4, atol=1e-5)
    target = sin * np.asarray(x0) - cos * np.asarray(eps)
    out = denoise(lambda prm, xi, cn, y: jnp.asarray(target, jnp.float32), None, p, x,
                  jnp.asarray(SIGMAS), None)
    np.testing.assert_allclose(out, x0, atol=2e-4)


@pytest.mark.parametrize("p,ideal", [(VE(), lambda eps: -eps), (VP(), lambda eps: eps)],
                         ids=["ve", "vp"])
def test_ve_vp_ideal_output_is_noise(p, ideal):
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    x0 = jax.random.uniform(k1, (len(SIGMAS), 2, 2, 3), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    x = x0 + jnp.asarray(SIGMAS, jnp.float32)[:, None, None, None] * eps
    out = denoise(lambda prm, xi, cn, y: ideal(eps), None, p, x, jnp.asarray(SIGMAS), None)
    np.testing.assert_allclose(out, x0, atol=5e-4 * 80)  # float32 rounding of x at sigma = 80
    np.testing.assert_allclose(out[:5], x0[:5], atol=1e-5)


def test_vp_sigma_of_t_and_its_inverse():
    p = VP()
    t = np.array([1e-5, 1e-3, 0.1, 0.5, 1.0])
    want = np.sqrt(np.exp(19.9 * t**2 / 2 + 0.1 * t) - 1)
    np.testing.assert_allclose(p.sigma(jnp.asarray(t)), want, rtol=1e-5)
    np.testing.assert_allclose(p.sigma_inv(p.sigma(jnp.asarray(t))), t, rtol=1e-4)


def test_denoise_feeds_the_network_c_in_x_and_c_noise():
    seen = {}

    def model(params, x_in, c_noise, labels):
        seen.update(x_in=x_in, c_noise=c_noise, labels=labels)
        return jnp.ones_like(x_in)

    p = EDM()
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 3, 1))
    out = denoise(model, None, p, x, 0.7, jnp.array([1, 2]))  # scalar sigma broadcasts to (B,)
    c_skip, c_out, c_in, c_noise = p.preconditioning(jnp.float32(0.7))
    np.testing.assert_allclose(seen["x_in"], c_in * x, rtol=1e-6)
    np.testing.assert_allclose(seen["c_noise"], [c_noise, c_noise], rtol=1e-6)
    np.testing.assert_array_equal(seen["labels"], [1, 2])
    np.testing.assert_allclose(out, c_skip * x + c_out, rtol=1e-6)
    bound = make_denoise_fn(_zero_model, None, p)
    np.testing.assert_array_equal(bound(x, jnp.full((2,), 0.7), None),
                                  denoise(_zero_model, None, p, x, jnp.full((2,), 0.7), None))


def test_training_sigma_laws():
    n = 20000
    key = jax.random.PRNGKey(4)
    # EDM: ln sigma ~ N(-1.2, 1.2^2).
    ls = np.log(np.asarray(EDM().sample_sigma(key, (n,)), np.float64))
    assert abs(ls.mean() + 1.2) < 0.04 and abs(ls.std() - 1.2) < 0.04
    assert stats.kstest(ls, stats.norm(-1.2, 1.2).cdf).pvalue > 1e-3
    # VE: ln sigma ~ U[ln 0.02, ln 100].
    s = np.asarray(VE().sample_sigma(key, (n,)), np.float64)
    lo, hi = math.log(0.02), math.log(100.0)
    assert s.min() >= 0.02 * (1 - 1e-6) and s.max() <= 100 * (1 + 1e-6)
    assert stats.kstest(np.log(s), stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    # v-prediction: t = (2/pi) arctan(sigma) ~ U[t(13), t(-9)]; sigma in [e^-6.5, e^4.5].
    s = np.asarray(VPrediction().sample_sigma(key, (n,)), np.float64)
    t_lo = 2 / np.pi * np.arccos(1 / np.sqrt(1 + np.exp(-13.0)))
    t_hi = 2 / np.pi * np.arccos(1 / np.sqrt(1 + np.exp(9.0)))
    assert s.min() >= math.exp(-6.5) * (1 - 1e-4) and s.max() <= math.exp(4.5) * (1 + 1e-4)
    assert stats.kstest(2 / np.pi * np.arctan(s), stats.uniform(t_lo, t_hi - t_lo).cdf).pvalue > 1e-3
    # VP: t ~ U[1e-5, 1] through sigma(t).
    s = np.asarray(VP().sample_sigma(key, (n,)), np.float64)
    t = np.asarray(VP().sigma_inv(jnp.asarray(s, jnp.float32)), np.float64)
    assert s.min() >= np.sqrt(np.expm1(0.1 * 1e-5)) * 0.99
    assert s.max() <= np.sqrt(np.expm1(19.9 / 2 + 0.1)) * 1.0001
    assert stats.kstest(t, stats.uniform(1e-5, 1 - 1e-5).cdf).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------------
# Per-example loss

def test_loss_construction_errors():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="noise_multiplicity"):
            make_per_example_loss(_toy_model, EDM(), bad, None)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="label_dropout"):
            make_per_example_loss(_toy_model, EDM(), 4, 10, label_dropout=bad)


def _example(key, label=1, shape=(4, 4, 2)):
    return {"image": jax.random.uniform(key, shape, minval=-1, maxval=1),
            "label": jnp.int32(label)}


@pytest.mark.parametrize("p", [EDM(), VPrediction()], ids=["edm", "v"])
def test_loss_is_mean_of_single_draw_losses(p):
    K, num_classes = 5, 3
    params = _toy_params(jax.random.PRNGKey(5))
    ex = _example(jax.random.PRNGKey(6))
    key = jax.random.PRNGKey(7)
    loss_fn = make_per_example_loss(_toy_model, p, K, num_classes, label_dropout=0.5)
    loss = jax.jit(loss_fn)(params, ex, key)
    assert loss.shape == () and loss.dtype == jnp.float32

    @jax.jit
    def draws(key):  # the documented key use
        k_drop, k_noise = jax.random.split(key)
        k_sig, k_eps = jax.random.split(jax.random.split(k_noise, K)[3])
        return (drop_label(k_drop, ex["label"], num_classes, 0.5),
                *draw_noise(p, k_noise, K, ex["image"].shape),
                p.sample_sigma(k_sig, ()), jax.random.normal(k_eps, (4, 4, 2)))

    label, sigma, eps, sigma_3, eps_3 = draws(key)
    assert sigma.shape == (K,) and eps.shape == (K, 4, 4, 2)
    assert len(np.unique(np.asarray(sigma))) == K  # K distinct draws

    @jax.jit
    def pieces(sigma, eps, label):
        singles = jax.vmap(lambda s, e: denoising_loss(_toy_model, params, p, ex["image"], label,
                                                       s[None], e[None]))(sigma, eps)
        c_skip, c_out, c_in, c_noise = p.preconditioning(sigma)
        x = ex["image"][None] + sigma[:, None, None, None] * eps
        f = _toy_model(params, c_in[:, None, None, None] * x, c_noise, jnp.full((K,), label))
        return singles, (c_skip, c_out), x, f, p.loss_weight(sigma)

    singles, (c_skip, c_out), x, f, w = jax.tree.map(np.asarray, pieces(sigma, eps, label))
    np.testing.assert_allclose(loss, np.mean(singles), rtol=1e-5)
    # And the formula itself, in numpy.
    c_skip, c_out, w = (a[:, None, None, None] for a in (c_skip, c_out, w))
    x0 = np.asarray(ex["image"])
    np.testing.assert_allclose(loss, np.mean(w * (c_skip * x + c_out * f - x0) ** 2), rtol=1e-4)
    # Draw k depends only on its own key, split(k_noise, K)[k].
    np.testing.assert_array_equal(sigma[3], sigma_3)
    np.testing.assert_array_equal(eps[3], eps_3)


def test_label_dropout_shared_by_the_k_draws_and_null_is_num_classes():
    K, num_classes, label = 4, 10, 7
    traced, calls = [], []

    def model(params, x_in, c_noise, labels):
        traced.append((x_in.shape, labels.shape, labels.dtype))  # once per trace
        jax.debug.callback(lambda y: calls.append(np.asarray(y)), labels)  # once per run
        return _toy_model(params, x_in, c_noise, labels)

    params = _toy_params(jax.random.PRNGKey(8), num_classes=num_classes)
    loss_fn = jax.jit(make_per_example_loss(model, EDM(), K, num_classes, label_dropout=0.5))
    ex = _example(jax.random.PRNGKey(9), label=label)
    for i in range(24):
        loss_fn(params, ex, jax.random.PRNGKey(100 + i)).block_until_ready()
    jax.effects_barrier()
    assert traced == [((K, 4, 4, 2), (K,), jnp.int32)]  # one network call on a batch of K rows
    assert len(calls) == 24
    seen = set()
    for labels in calls:
        assert len(set(labels.tolist())) == 1  # the K draws share the dropout decision
        seen.add(int(labels[0]))
    assert seen == {label, num_classes}
    # Dropout rate, and no dropout at label_dropout = 0.
    keys = jax.random.split(jax.random.PRNGKey(10), 4000)
    dropped = jax.vmap(lambda k: drop_label(k, 7, num_classes, 0.3))(keys)
    assert set(np.unique(dropped).tolist()) == {7, num_classes}
    assert abs(np.mean(np.asarray(dropped) == num_classes) - 0.3) < 0.03
    assert np.all(np.asarray(jax.vmap(lambda k: drop_label(k, 7, num_classes, 0.0))(keys)) == 7)


def test_unconditional_loss_passes_no_labels():
    calls = []

    def model(params, x_in, c_noise, labels):
        calls.append(labels)  # at trace time
        return _toy_model(params, x_in, c_noise, None)

    loss_fn = jax.jit(make_per_example_loss(model, VE(), 3, None))
    loss = loss_fn(_toy_params(jax.random.PRNGKey(11)),
                   {"image": jnp.zeros((4, 4, 2))}, jax.random.PRNGKey(12))
    assert calls == [None] and np.isfinite(loss)


def test_vmapped_losses_and_grads_are_per_example():
    K, num_classes, B = 3, 3, 4
    params = _toy_params(jax.random.PRNGKey(13), num_classes=num_classes)
    loss_fn = make_per_example_loss(_toy_model, EDM(), K, num_classes)
    images = jax.random.uniform(jax.random.PRNGKey(14), (B, 4, 4, 2), minval=-1, maxval=1)
    batch = {"image": images, "label": jnp.array([0, 1, 2, 1], jnp.int32)}
    keys = jax.random.split(jax.random.PRNGKey(15), B)
    batched = jax.jit(jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, 0)))
    losses, grads = batched(params, batch, keys)
    assert losses.shape == (B,)
    # Each row equals the unbatched computation.
    single = jax.jit(jax.value_and_grad(loss_fn))
    for i in range(B):
        loss_i, grad_i = single(params, {"image": images[i], "label": batch["label"][i]}, keys[i])
        np.testing.assert_allclose(losses[i], loss_i, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6),
                     grads, grad_i)
    # Changing example 2 changes nothing for the others.
    batch2 = {"image": images.at[2].set(-images[2]), "label": batch["label"].at[2].set(0)}
    losses2, grads2 = batched(params, batch2, keys)
    assert losses2[2] != losses[2]
    for i in (0, 1, 3):
        assert losses2[i] == losses[i]
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b[i]), grads, grads2)
