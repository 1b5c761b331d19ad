"""The split_wgrad convolution (models/layers.py) computes exactly what lax.conv computes.

It changes only HOW the weight gradient is evaluated (row groups; one convolution per example
under vmap), so forward values, gradients, per-example gradients and the DP engine's clipped
sums must agree with the plain XLA convolution, including inside shard_map.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dpdm_jax.diffusion import get_parameterisation, make_per_example_loss
from dpdm_jax.dp import sharding
from dpdm_jax.dp.clipping import clipped_grad_sum
from dpdm_jax.models import DDPMpp, count_params, init_shapes, layers

DIMS = ("NHWC", "HWIO", "NHWC")
split = layers.split_wgrad_conv_general_dilated


def ref_conv(x, w, padding="SAME"):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DIMS)


def _arrays(seed=0, b=3, n=5, hw=6, cin=4, cout=3, k=3):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, n, hw, hw, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
    return x, w


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("group_rows", [1, 2, 100])  # 100: one group
def test_values_gradients_and_per_example_gradients(monkeypatch, kernel, group_rows):
    x, w = _arrays(k=kernel)
    monkeypatch.setattr(layers, "WGRAD_GROUP_BYTES", group_rows * 6 * 6 * 4 * 4)
    ours = lambda w, x: jnp.sum(jnp.sin(split(x, w, (1, 1), "SAME", dimension_numbers=DIMS)))
    ref = lambda w, x: jnp.sum(jnp.sin(ref_conv(x, w)))
    np.testing.assert_allclose(split(x[0], w, (1, 1), ((1, 1), (1, 1)) if kernel == 3 else "SAME"),
                               ref_conv(x[0], w), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.jit(jax.grad(ours, (0, 1)))(w, x[0]), jax.grad(ref, (0, 1))(w, x[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Per-example gradients (vmap over the leading axis, parameters shared), as DP-SGD takes them.
    per_ex = jax.jit(jax.vmap(jax.grad(ours, (0, 1)), in_axes=(None, 0)))(w, x)
    per_ex_ref = jax.vmap(jax.grad(ref, (0, 1)), in_axes=(None, 0))(w, x)
    assert per_ex[0].shape == (3,) + w.shape
    for a, b in zip(per_ex, per_ex_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_rejects_what_it_does_not_implement():
    x, w = _arrays()
    with pytest.raises(NotImplementedError):
        split(x[0], w, (2, 2), "SAME", dimension_numbers=DIMS)
    with pytest.raises(ValueError):
        layers.set_conv_impl("cudnn")


TINY = dict(image_size=8, in_channels=2, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
            num_classes=3)


def _clipped_sums(impl, monkeypatch, num_devices):
    monkeypatch.setattr(layers, "_conv_impl", impl)
    model = DDPMpp(**TINY)
    shapes = init_shapes(model)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), shapes)["params"]
    loss = make_per_example_loss(lambda p, x, c, y: model.apply({"params": p}, x, c, y),
                                 get_parameterisation("edm"), 3, 3, 0.1)
    b = 4
    examples = {"image": rng.uniform(-1, 1, (b, 8, 8, 2)).astype(np.float32),
                "label": rng.integers(0, 3, b).astype(np.int32)}
    ids, mask = np.arange(b, dtype=np.int32), np.array([True, True, True, False])
    mesh = sharding.data_mesh(jax.devices()[:num_devices])
    f = jax.jit(sharding.sharded_clipped_grad_sum(loss, mesh, 0.5))
    got = f(params, *sharding.put_batch(mesh, (examples, ids, mask)), jax.random.key(3))
    assert count_params(params) == count_params(shapes)
    return got


def test_dp_clipped_sum_same_with_both_impls_and_sharded(monkeypatch):
    """Tiny DDPM++ through the engine: identical clipped sums and norms (each example's own gradient)."""
    (g_ref, s_ref) = _clipped_sums("xla", monkeypatch, 1)
    (g, s) = _clipped_sums("split_wgrad", monkeypatch, 2)
    assert float(s.num_examples) == 3
    np.testing.assert_allclose(s.norm_sum, s_ref.norm_sum, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
