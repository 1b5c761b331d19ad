"""Noise, normalisation and the composed DP-SGD step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpdm_jax.dp import DPSGDStep, PoissonSampler, ema_decay, noise_multiplicity_loss
from dpdm_jax.dp.clipping import clipped_grad_sum
from dpdm_jax.dp.noise import privatise_gradient_sum
from dpdm_jax.dp.sharding import data_mesh, put_batch, replicated
from dpdm_jax.dp.step import step_keys
from tests.dp_helpers import draw_loss, init_params, make_examples

LOSS = noise_multiplicity_loss(draw_loss, 2)


def test_noise_std_is_sigma_c_over_expected_batch():
    zeros = {"a": jnp.zeros((300, 300)), "b": jnp.zeros((1000,))}
    sigma, c, b = 3.0, 0.5, 40.0
    out = privatise_gradient_sum(zeros, jax.random.key(0), sigma, c, b)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)])
    assert abs(flat.std() * b / (sigma * c) - 1) < 0.01
    assert abs(flat.mean()) * b < 0.05
    # Different leaves get independent noise.
    assert not np.allclose(out["a"].ravel()[:1000], out["b"])


def test_noise_keeps_each_leaf_dtype_and_shape_and_is_independent_across_leaves():
    from dpdm_jax.dp import gaussian_noise_like

    tree = {"a": jnp.zeros((40, 50), jnp.bfloat16), "b": jnp.zeros((40, 50)), "c": jnp.zeros((), jnp.float32)}
    noise = gaussian_noise_like(tree, jax.random.key(5), 2.0)
    assert {k: (v.dtype, v.shape) for k, v in noise.items()} == {k: (v.dtype, v.shape) for k, v in tree.items()}
    a, b = np.asarray(noise["a"], np.float32).ravel(), np.asarray(noise["b"]).ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.1 and abs(b.std() / 2.0 - 1) < 0.05
    assert gaussian_noise_like({}, jax.random.key(5), 2.0) == {}


def test_normalised_by_expected_not_realised_batch():
    g = {"w": jnp.full((3,), 6.0)}
    out = privatise_gradient_sum(g, jax.random.key(0), 0.0, 1.0, expected_batch_size=4.0)
    np.testing.assert_allclose(out["w"], 1.5)


def test_noise_identical_on_every_device():
    mesh = data_mesh(jax.devices()[:8])
    g = jax.device_put({"w": jnp.zeros((64,))}, replicated(mesh))
    f = jax.jit(lambda g, k: privatise_gradient_sum(g, k, 1.0, 1.0, 1.0), out_shardings=replicated(mesh))
    out = f(g, jax.random.key(3))
    shards = [np.asarray(s.data) for s in out["w"].addressable_shards]
    assert len(shards) == 8
    for s in shards[1:]:
        np.testing.assert_array_equal(s, shards[0])
    assert np.std(shards[0]) > 0.5


def test_ema_warmup():
    np.testing.assert_allclose(ema_decay(0), 0.1)
    np.testing.assert_allclose(ema_decay(10), 11 / 20)
    np.testing.assert_allclose(ema_decay(100000), 0.999)


def _host_chunks(examples, sampler, step, seed):
    for c in sampler.chunks(seed, step):
        yield jax.tree.map(lambda a: a[c.indices], examples), c.indices, c.mask


def test_step_equals_manual_dp_sgd():
    """One step by hand: clipped sum + the step's noise, / qN, Adam, EMA."""
    n, q, sigma, c = 40, 0.25, 0.7, 1.0
    data = make_examples(n)
    params = init_params()
    opt = optax.adam(3e-4)
    run_key = jax.random.key(11)
    dp_step = DPSGDStep(LOSS, opt, clip_norm=c, noise_multiplier=sigma, expected_batch_size=q * n,
                        mesh=data_mesh(jax.devices()[:1]))
    sampler = PoissonSampler(n, q, chunk_size=4)
    state = dp_step.init(params)
    new_state, stats = dp_step(state, _host_chunks(data, sampler, 0, 5), run_key, 0)

    idx = sampler.batch_indices(5, 0)
    grad_key, noise_key = step_keys(run_key, 0)
    gsum, _ = clipped_grad_sum(LOSS, params, jax.tree.map(lambda a: a[idx], data), jnp.asarray(idx, jnp.int32),
                               jnp.ones(len(idx), bool), grad_key, c)
    g = privatise_gradient_sum(gsum, noise_key, sigma, c, q * n)
    updates, _ = opt.update(g, opt.init(params), params)
    expected = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    ema = jax.tree.map(lambda e, p: e - (1 - 0.1) * (e - p), params, expected)
    for a, b in zip(jax.tree.leaves(new_state.ema_params), jax.tree.leaves(ema)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(new_state.step) == 1 and stats.num_examples == len(idx)


def test_step_independent_of_chunk_size_and_devices():
    n, q = 48, 0.3
    data = make_examples(n)
    run_key = jax.random.key(2)
    results = []
    for chunk, devices in [(4, 1), (16, 4), (8, 8)]:
        step = DPSGDStep(LOSS, optax.adam(1e-2), clip_norm=1.0, noise_multiplier=0.5, expected_batch_size=q * n,
                         mesh=data_mesh(jax.devices()[:devices]))
        sampler = PoissonSampler(n, q, chunk_size=chunk, num_devices=devices)
        state = step.init(init_params())
        for t in range(3):
            state, _ = step(state, _host_chunks(data, sampler, t, 9), run_key, t)
        results.append(jax.device_get(state.params))
    for other in results[1:]:
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_devices_are_summed_once_per_step_not_per_chunk():
    """The chunk program has no cross-device collective; the step's end all-reduces the partial sums.

    Before, every chunk's clipped sum was psum'd: two local processes synchronised 16 times a step.
    """
    devices, chunk, n = 4, 8, 40
    data = make_examples(n)
    step = DPSGDStep(LOSS, optax.adam(1e-2), clip_norm=1.0, noise_multiplier=0.5, expected_batch_size=10.0,
                     mesh=data_mesh(jax.devices()[:devices]))
    state = step.init(init_params())
    partial = step._zero_partial_sums(state.params)
    assert all(x.shape[0] == devices and len(x.sharding.device_set) == devices for x in jax.tree.leaves(partial))
    idx = np.arange(chunk, dtype=np.int32)
    examples, ids, mask = put_batch(step.mesh, (jax.tree.map(lambda a: a[idx], data), idx, np.ones(chunk, bool)))
    grad_key, noise_key = step_keys(jax.random.key(0), 0)
    chunk_hlo = step._accumulate.lower(partial, state.params, examples, ids, mask, grad_key).compile().as_text()
    finish_hlo = step._update.lower(state, partial, noise_key).compile().as_text()
    collectives = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
    assert not [c for c in collectives if c in chunk_hlo]
    assert "all-reduce" in finish_hlo
    # Partial sums of two chunks, summed over devices, equal the clipped sum of their 16 examples.
    for lo in (0, chunk):
        idx = np.arange(lo, lo + chunk, dtype=np.int32)
        batch = put_batch(step.mesh, (jax.tree.map(lambda a: a[idx], data), idx, np.ones(chunk, bool)))
        partial = step._accumulate(partial, state.params, *batch, grad_key)
    both = np.arange(2 * chunk, dtype=np.int32)
    expected, stats = clipped_grad_sum(LOSS, init_params(), jax.tree.map(lambda a: a[both], data), jnp.asarray(both),
                                       jnp.ones(2 * chunk, bool), grad_key, 1.0)
    total = jax.tree.map(lambda x: np.asarray(x).sum(0), partial)
    for a, b in zip(jax.tree.leaves(total[0]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert total[1].num_examples == 2 * chunk == stats.num_examples


def test_empty_batch_still_noisy_update_and_step_check():
    step = DPSGDStep(LOSS, optax.sgd(1.0), clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0,
                     mesh=data_mesh(jax.devices()[:1]))
    params = init_params()
    state = step.init(params)
    new_state, stats = step(state, [], jax.random.key(0), 0)
    assert stats.num_examples == 0
    assert not np.allclose(new_state.params["w2"], params["w2"])
    with pytest.raises(ValueError, match="step"):
        step(new_state, [], jax.random.key(0), 5)


@pytest.mark.parametrize("kwargs", [dict(clip_norm=0.0), dict(noise_multiplier=-1.0), dict(expected_batch_size=0.0)])
def test_step_rejects_invalid(kwargs):
    args = dict(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError):
        DPSGDStep(LOSS, optax.sgd(1.0), **args)


def test_run_key_uses_all_64_seed_bits():
    from dpdm_jax.dp import run_key_from_seed

    a = jax.random.normal(run_key_from_seed(5), (4,))
    b = jax.random.normal(run_key_from_seed(5 + 2**40), (4,))  # same low 32 bits
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, jax.random.normal(run_key_from_seed(5), (4,)))
    with pytest.raises(ValueError):
        run_key_from_seed(-1)


def test_models_with_batch_statistics_are_refused():
    from dpdm_jax.dp import check_params_only

    check_params_only({"params": {"w": 1}})
    with pytest.raises(ValueError, match="BatchNorm"):
        check_params_only({"params": {"w": 1}, "batch_stats": {"mean": 0}})
