"""Privacy invariants of the clipped per-example gradient sum."""
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import PartitionSpec as P

from dpdm_jax.dp import clipping, sharding
from dpdm_jax.dp.clipping import clipped_grad_sum, example_key, noise_multiplicity_loss
from tests.dp_helpers import draw_loss, init_params, make_examples

K = 4
LOSS = noise_multiplicity_loss(draw_loss, K)
KEY = jax.random.key(7)
# clip_norm is traced (one compilation for all values); the loss and micro-batch are static.
_clipped_grad_sum = jax.jit(clipped_grad_sum, static_argnums=(0, 7))


def run(examples, ids, mask, clip_norm=1.0, microbatch_size=None, params=None):
    params = init_params() if params is None else params
    return _clipped_grad_sum(LOSS, params, examples, ids, mask, KEY, clip_norm, microbatch_size)


def per_example_grads(params, examples, ids):
    keys = jax.vmap(lambda i: example_key(KEY, i))(ids)
    return jax.vmap(jax.grad(LOSS), in_axes=(None, 0, 0))(params, examples, keys)


def tree_allclose(a, b, **kw):
    return all(np.allclose(x, y, **kw) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@settings(max_examples=25, deadline=None)
@given(
    x=hnp.arrays(np.float32, (1, 6), elements=st.floats(-1e3, 1e3, width=32)),
    y=st.floats(-1e3, 1e3, width=32),
    clip_norm=st.floats(1e-3, 1e2),
    seed=st.integers(0, 2**16),
)
def test_clipped_norm_at_most_c(x, y, clip_norm, seed):
    examples = {"x": x, "y": np.array([y], np.float32)}
    grad, stats = run(examples, np.array([seed], np.int32), np.array([True]), clip_norm, params=init_params(seed % 7))
    assert float(optax.global_norm(grad)) <= clip_norm * (1 + 1e-5)
    assert stats.num_examples == 1


def test_sum_equals_sum_of_individually_clipped():
    ex = make_examples(8)
    ids = np.arange(8, dtype=np.int32)
    params = init_params()
    grads = per_example_grads(params, ex, ids)
    norms = jax.vmap(optax.global_norm)(grads)
    assert np.sum(np.asarray(norms) > 1.0) >= 2, "test needs some clipped rows"
    scale = np.minimum(1.0, 1.0 / np.asarray(norms))
    expected = jax.tree.map(lambda g: jnp.tensordot(scale, g, axes=1), grads)
    got, stats = run(ex, ids, np.ones(8, bool), 1.0)
    assert tree_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert stats.num_clipped == np.sum(np.asarray(norms) > 1.0)
    np.testing.assert_allclose(stats.norm_sum, np.sum(norms), rtol=1e-5)


def test_padding_and_nonfinite_rows_contribute_zero():
    ex = make_examples(8)
    ids = np.arange(8, dtype=np.int32)
    mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
    ref, _ = run(jax.tree.map(lambda a: a[:5], ex), ids[:5], mask[:5])
    # Garbage (even NaN/Inf) in padding rows must not matter.
    ex_bad = jax.tree.map(np.copy, ex)
    ex_bad["x"][5] = np.nan
    ex_bad["x"][6] = np.inf
    ex_bad["x"][7] = 1e30
    got, stats = run(ex_bad, ids, mask)
    assert tree_allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert stats.num_examples == 5 and stats.num_nonfinite == 0
    # A real row whose gradient is NaN contributes exactly zero and is counted.
    ex_nan = jax.tree.map(lambda a: a[:6].copy(), ex)
    ex_nan["x"][5] = np.nan
    got, stats = run(ex_nan, ids[:6], np.ones(6, bool))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(got))
    assert tree_allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert stats.num_nonfinite == 1 and stats.num_examples == 6


def test_public_per_example_clipped_gradients_sum_to_the_engine_sum():
    """`clipped_example_grad` (for per-example analyses) is what the engine sums, row by row."""
    ex = make_examples(6)
    ex["x"][4] = np.nan  # a non-finite real row
    ids = np.arange(6, dtype=np.int32)
    mask = np.array([1, 1, 1, 1, 1, 0], bool)  # the last row is padding
    params = init_params()
    keys = jax.vmap(lambda i: example_key(KEY, i))(ids)
    rows, stats = jax.vmap(lambda e, k, m: clipping.clipped_example_grad(LOSS, 1.0, params, e, k, m))(ex, keys, mask)
    norms = np.asarray(jax.vmap(optax.global_norm)(rows))
    assert np.all(norms <= 1.0 + 1e-5) and norms[4] == 0.0 and norms[5] == 0.0
    assert np.sum(norms > 0.99) >= 2, "test needs some clipped rows"
    total, total_stats = run(ex, ids, mask)
    assert tree_allclose(jax.tree.map(lambda g: g.sum(0), rows), total, rtol=1e-5, atol=1e-6)
    assert float(stats.num_nonfinite.sum()) == float(total_stats.num_nonfinite) == 1.0


def test_all_padding_chunk_is_zero():
    ex = make_examples(4)
    got, stats = run(ex, np.zeros(4, np.int32), np.zeros(4, bool))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(got))
    assert stats.num_examples == 0


@pytest.mark.parametrize("microbatch_size", [None, 1, 2, 6])
def test_sum_independent_of_chunking(microbatch_size):
    ex = make_examples(12)
    ids = np.arange(100, 112, dtype=np.int32)
    full, full_stats = run(ex, ids, np.ones(12, bool))
    for chunk in (12, 6, 5):
        acc = jax.tree.map(jnp.zeros_like, full)
        n_examples = 0.0
        for s in range(0, 12, chunk):
            part = jax.tree.map(lambda a: a[s : s + chunk], ex)
            n = len(part["y"])
            pad = lambda a: np.concatenate([a, np.zeros((chunk - n,) + a.shape[1:], a.dtype)])
            mb = microbatch_size if microbatch_size and chunk % microbatch_size == 0 else None
            g, st_ = run(jax.tree.map(pad, part), pad(ids[s : s + chunk]), pad(np.ones(n, bool)), microbatch_size=mb)
            acc = jax.tree.map(jnp.add, acc, g)
            n_examples += float(st_.num_examples)
        assert tree_allclose(acc, full, rtol=1e-5, atol=1e-6), chunk
        assert n_examples == 12


def test_microbatch_must_divide():
    ex = make_examples(6)
    with pytest.raises(ValueError, match="multiple of microbatch_size"):
        run(ex, np.arange(6, dtype=np.int32), np.ones(6, bool), microbatch_size=4)


@pytest.mark.parametrize("num_devices", [1, 4, 8])
def test_sum_and_norms_independent_of_device_count(num_devices):
    assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
    ex = make_examples(16)
    ids = np.arange(16, dtype=np.int32)
    mask = np.array([True] * 13 + [False] * 3)
    ref, ref_stats = run(ex, ids, mask)
    mesh = sharding.data_mesh(jax.devices()[:num_devices])
    f = jax.jit(sharding.sharded_clipped_grad_sum(LOSS, mesh, 1.0))
    got, stats = f(init_params(), *sharding.put_batch(mesh, (ex, ids, mask)), KEY)
    assert tree_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # The sum of unclipped per-example norms pins each example's own gradient: it would change
    # if gradients were summed across devices before clipping.
    np.testing.assert_allclose(stats.norm_sum, ref_stats.norm_sum, rtol=1e-5)
    assert stats.num_examples == 13


def test_without_pcast_examples_would_mix_across_devices():
    """Shows the device-count test can fail: the naive shard_map mixes gradients before clipping."""
    mesh = sharding.data_mesh(jax.devices()[:4])
    ex = make_examples(8)
    ids = np.arange(8, dtype=np.int32)
    mask = np.ones(8, bool)

    def naive(params, examples, example_ids, m, key):
        g, s = clipped_grad_sum(LOSS, params, examples, example_ids, m, key, 1.0)
        return jax.lax.psum((g, s), "data")

    f = jax.jit(jax.shard_map(naive, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data"), P()), out_specs=(P(), P())))
    _, ref_stats = run(ex, ids, mask)
    try:
        _, stats = f(init_params(), *sharding.put_batch(mesh, (ex, ids, mask)), KEY)
    except Exception:  # a future JAX may reject this program outright, which is also safe
        return
    assert not np.isclose(float(stats.norm_sum), float(ref_stats.norm_sum), rtol=1e-3)


def test_matches_jax_privacy_reference():
    jax_privacy_clipping = pytest.importorskip("jax_privacy.clipping")
    ex = make_examples(10)
    ids = np.arange(10, dtype=np.int32)
    mask = np.array([True] * 7 + [False] * 3)
    params = init_params()
    # jax_privacy vmaps over (example, key) pairs; give it the same per-example keys.
    keys = jax.vmap(lambda i: example_key(KEY, i))(ids)
    ref_fn = jax_privacy_clipping.clipped_grad(
        lambda p, e, k: LOSS(p, e, k), batch_argnums=(1, 2), keep_batch_dim=False, l2_clip_norm=1.0
    )
    ref = ref_fn(params, ex, keys, is_padding_example=~mask)
    got, _ = run(ex, ids, mask)
    assert tree_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_noise_draws_are_averaged_before_clipping():
    """Sensitivity C per EXAMPLE: the K draws' mean is clipped, not each draw."""

    def draw(params, example, key):
        z = jax.random.normal(key, example["x"].shape)  # each draw pulls another way
        return 0.5 * jnp.sum((params["theta"] - example["x"] * z) ** 2)

    k = 3
    params = {"theta": jnp.zeros(4)}
    example = {"x": jnp.full((1, 4), 10.0)}
    loss = noise_multiplicity_loss(draw, k)
    got, _ = clipped_grad_sum(loss, params, example, jnp.array([5]), jnp.array([True]), KEY, 1.0)
    # By hand: the same K keys the loss uses.
    draw_keys = jax.random.split(example_key(KEY, 5), k)
    per_draw = [jax.grad(draw)(params, {"x": example["x"][0]}, dk)["theta"] for dk in draw_keys]
    mean = sum(per_draw) / k
    clip = lambda g: g * min(1.0, 1.0 / float(jnp.linalg.norm(g)))
    np.testing.assert_allclose(got["theta"], clip(mean), rtol=1e-5)
    per_draw_clipped = sum(clip(g) for g in per_draw) / k
    assert not np.allclose(per_draw_clipped, clip(mean), rtol=1e-3)


def test_noise_multiplicity_validation():
    with pytest.raises(ValueError, match="K must be >= 1"):
        noise_multiplicity_loss(draw_loss, 0)
