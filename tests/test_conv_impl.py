"""Every convolution implementation (models/layers.py CONV_IMPLS) computes what lax.conv computes.

They change only HOW the passes are evaluated (row groups, one convolution per example under
vmap, patches times a matrix), so forward values, gradients, per-example gradients and the DP
engine's clipped sums must agree with the plain XLA convolution, including inside shard_map.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dpdm_jax.diffusion import get_parameterisation, make_per_example_loss
from dpdm_jax.dp import sharding
from dpdm_jax.models import DDPMpp, count_params, init_shapes, layers, onednn

DIMS = ("NHWC", "HWIO", "NHWC")
CUSTOM = [impl for impl in layers.CONV_IMPLS if impl not in ("auto", "xla")]


def skip_if_unavailable(impl):
    """conv_impl='onednn' needs g++ and libdnnl-dev (.ci/run installs them where it can)."""
    if impl == "onednn" and not onednn.available():
        pytest.skip(f"oneDNN kernels unavailable: {onednn.unavailable_reason()}")


def ref_conv(x, w, padding="SAME"):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DIMS)


def _arrays(seed=0, b=3, n=5, hw=6, cin=4, cout=3, k=3):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, n, hw, hw, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
    return x, w


@pytest.mark.parametrize("impl", CUSTOM)
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("group_rows", [1, 100])  # split_wgrad's row groups: 1 row, one group
def test_values_gradients_and_per_example_gradients(monkeypatch, impl, kernel, group_rows):
    skip_if_unavailable(impl)
    x, w = _arrays(k=kernel)
    monkeypatch.setattr(layers, "WGRAD_GROUP_BYTES", group_rows * 6 * 6 * 4 * 4)
    conv = layers.custom_conv_general_dilated(impl)
    ours = lambda w, x: jnp.sum(jnp.sin(conv(x, w, (1, 1), "SAME", dimension_numbers=DIMS)))
    ref = lambda w, x: jnp.sum(jnp.sin(ref_conv(x, w)))
    explicit = ((1, 1), (1, 1)) if kernel == 3 else ((0, 0), (0, 0))
    np.testing.assert_allclose(conv(x[0], w, (1, 1), explicit), ref_conv(x[0], w), rtol=1e-5, atol=1e-5)
    # Gradients sum 36 products per weight in another order than XLA's own convolution: float32
    # reassociation differs by CPU (1.4e-5 measured on an AMD EPYC), a wrong gradient by O(0.1).
    for a, b in zip(jax.jit(jax.grad(ours, (0, 1)))(w, x[0]), jax.grad(ref, (0, 1))(w, x[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-5)
    # Per-example gradients (vmap over the leading axis, parameters shared), as DP-SGD takes them.
    per_ex = jax.jit(jax.vmap(jax.grad(ours, (0, 1)), in_axes=(None, 0)))(w, x)
    per_ex_ref = jax.vmap(jax.grad(ref, (0, 1)), in_axes=(None, 0))(w, x)
    assert per_ex[0].shape == (3,) + w.shape
    for a, b in zip(per_ex, per_ex_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("impl", ["patches", "onednn"])
@pytest.mark.parametrize("padding", [((0, 0), (0, 0)), ((2, 0), (0, 1)), "VALID"])
def test_other_paddings(impl, padding):
    """The patches and oneDNN passes hold for any stride-1 padding, not only SAME."""
    skip_if_unavailable(impl)
    x, w = _arrays(k=3)
    conv = layers.custom_conv_general_dilated(impl)
    ours = lambda w, x: jnp.sum(jnp.sin(conv(x, w, (1, 1), padding)))
    ref = lambda w, x: jnp.sum(jnp.sin(ref_conv(x, w, padding)))
    np.testing.assert_allclose(conv(x[0], w, (1, 1), padding), ref_conv(x[0], w, padding), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.grad(ours, (0, 1))(w, x[0]), jax.grad(ref, (0, 1))(w, x[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_onednn_per_example_gradients_under_nested_vmap_and_shared_kernels():
    """vmap over examples of vmap over K draws (rows fold into one call), and a kernel per example."""
    skip_if_unavailable("onednn")
    x, w = _arrays(b=2, n=3, k=3)  # (examples, draws, H, W, C)
    conv = layers.custom_conv_general_dilated("onednn")
    ours = lambda w, x: jnp.sum(jnp.sin(conv(x[None], w, (1, 1), "SAME")))
    ref = lambda w, x: jnp.sum(jnp.sin(ref_conv(x[None], w)))
    nested = lambda f: jax.jit(jax.vmap(jax.vmap(jax.grad(f, (0, 1)), in_axes=(None, 0)), in_axes=(None, 0)))
    for a, b in zip(nested(ours)(w, x), nested(ref)(w, x)):
        assert a.shape[:2] == (2, 3)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-5)
    ws = jnp.stack([w, 2 * w])  # a different kernel per mapped index: one call each
    per_kernel = jax.jit(jax.vmap(lambda w, x: conv(x, w, (1, 1), "SAME")))(ws, x)
    np.testing.assert_allclose(per_kernel, jax.vmap(ref_conv)(x, ws), rtol=1e-5, atol=1e-5)


def test_onednn_unavailable_fails_before_compute_with_the_reason(monkeypatch):
    from configs import test_tiny
    from dpdm_jax import experiment

    monkeypatch.setattr(onednn, "_load", lambda: "no libdnnl here")
    config = test_tiny.get_config()
    config.model.conv_impl = "onednn"
    with pytest.raises(ValueError, match="model.conv_impl='onednn' cannot run here: no libdnnl here"):
        experiment.validate_config(config)
    with pytest.raises(onednn.OnednnUnavailable, match="no libdnnl here"):
        init_shapes(DDPMpp(**TINY, conv_impl="onednn"))


def test_rejects_what_it_does_not_implement():
    x, w = _arrays()
    with pytest.raises(NotImplementedError):
        layers.custom_conv_general_dilated("split_wgrad")(x[0], w, (2, 2), "SAME", dimension_numbers=DIMS)
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        layers.resolve_conv_impl("cudnn")
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        init_shapes(DDPMpp(**TINY, conv_impl="cudnn"))
    expected = layers.AUTO_CONV_IMPL.get(jax.default_backend(), "xla")
    if expected == "onednn" and (jax.local_device_count() > 1 or not onednn.available()):
        expected = layers.AUTO_CPU_FALLBACK
    assert layers.resolve_conv_impl("auto") == expected


def test_auto_is_onednn_on_a_single_cpu_device_where_it_builds(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(jax, "local_device_count", lambda: 1)
    monkeypatch.setattr(onednn, "_load", lambda: None)
    assert layers.resolve_conv_impl("auto") == "onednn"
    monkeypatch.setattr(onednn, "_load", lambda: "no libdnnl here")  # falls back, never fails
    assert layers.resolve_conv_impl("auto") == layers.AUTO_CPU_FALLBACK == "split_wgrad"
    monkeypatch.setattr(onednn, "_load", lambda: None)
    monkeypatch.setattr(jax, "local_device_count", lambda: 8)  # fake devices share the cores
    assert layers.resolve_conv_impl("auto") == "split_wgrad"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layers.resolve_conv_impl("auto") == "xla"


def test_conv_impl_is_part_of_the_model_and_not_of_its_parameters():
    a, b = DDPMpp(**TINY, conv_impl="xla"), DDPMpp(**TINY, conv_impl="patches")
    assert a != b and hash(a) != hash(b)  # jit caches keyed on the model see the implementation
    assert jax.tree.map(lambda s: (s.shape, s.dtype), init_shapes(a)) == \
        jax.tree.map(lambda s: (s.shape, s.dtype), init_shapes(b))


TINY = dict(image_size=8, in_channels=2, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
            num_classes=3)


def _clipped_sums(impl, num_devices):
    model = DDPMpp(**TINY, conv_impl=impl)
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


@pytest.mark.parametrize("impl", CUSTOM)
def test_dp_clipped_sum_same_as_xla_and_sharded(impl):
    """Tiny DDPM++ through the engine: identical clipped sums and norms (each example's own gradient)."""
    skip_if_unavailable(impl)
    (g_ref, s_ref) = _clipped_sums("xla", 1)
    (g, s) = _clipped_sums(impl, 2)
    assert float(s.num_examples) == 3
    np.testing.assert_allclose(s.norm_sum, s_ref.norm_sum, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
