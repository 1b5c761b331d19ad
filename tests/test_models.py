"""DDPM++ U-Net: paper parameter counts (shape-only), shapes, per-example independence."""
import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpdm_jax.models import DDPMpp, count_params, ddpmpp_for, init_shapes

# Official network sizes (design/method.md section 3).
PAPER_COUNTS = {
    "mnist": 1_753_345,
    "fashion_mnist": 1_753_345,
    "cifar10": 1_754_499,
    "celeba32": 1_804_451,
    "celeba64": 1_999_907,
    "imagenet32": 1_836_483,
}


@pytest.mark.parametrize("dataset", sorted(PAPER_COUNTS))
def test_paper_param_counts(dataset):
    variables = init_shapes(ddpmpp_for(dataset))
    assert set(variables) == {"params"}
    assert count_params(variables) == PAPER_COUNTS[dataset]


def test_mnist_breakdown_by_layer_type():
    """(parameters, layers) per type, as listed in method.md for the official MNIST network."""
    params = init_shapes(ddpmpp_for("mnist"))["params"]
    n, layers = collections.Counter(), collections.Counter()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        module = path[-2].key
        kind = ("embed" if module == "label_embed" else "gn" if module.startswith("norm")
                else "attn" if module in ("q", "k", "v", "out")
                else "dense" if module.startswith("emb") else "conv")
        n[kind] += math.prod(leaf.shape)
        layers[kind] += path[-1].key in ("kernel", "scale", "embedding")
    assert dict(n) == {"conv": 1_511_009, "dense": 169_344, "attn": 66_560, "gn": 6_080,
                       "embed": 352}
    assert dict(layers) == {"conv": 58, "dense": 23, "attn": 16, "gn": 47, "embed": 1}


def test_unknown_dataset_and_overrides():
    with pytest.raises(ValueError):
        ddpmpp_for("svhn")
    m = ddpmpp_for("cifar10", nf=16, attn_resolutions=[8])
    assert m.nf == 16 and m.attn_resolutions == (8,) and m.num_classes == 10


# Tiny models for everything that computes: 8x8 images, two levels (8 -> 4), attention at 4.
TINY = dict(image_size=8, in_channels=2, nf=8, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(4,))


def _inputs(b, key=0, num_classes=3):
    rng = np.random.default_rng(key)
    x = rng.standard_normal((b, 8, 8, 2)).astype(np.float32)
    noise = rng.standard_normal((b,)).astype(np.float32)
    labels = rng.integers(0, num_classes + 1, (b,)).astype(np.int32)  # includes null
    return jnp.asarray(x), jnp.asarray(noise), jnp.asarray(labels)


def _o1_params(model, seed=1):
    """Fan-in-scaled random parameters for `model`, drawn with numpy from the eval_shape'd
    variables. The output is then O(1) rather than ~0 (the near-zero init of the last convs
    would make equality checks vacuous), and no XLA compile of the PRNG is needed (compiling
    a threefry init of even the tiny net takes ~20 s on the build machine)."""
    rng = np.random.default_rng(seed)
    variables = init_shapes(model)
    assert set(variables) == {"params"}
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)
                              / math.sqrt(max(1, math.prod(s.shape[:-1])))), variables)


@pytest.fixture(scope="module")
def cond():
    model = DDPMpp(num_classes=3, **TINY)
    return model, _o1_params(model), jax.jit(model.apply)


def test_real_init_only_params_and_near_zero_output(cond):
    model, _, apply = cond
    x, noise, labels = _inputs(4)
    # rbg keys: same init code, far cheaper to compile on CPU than threefry.
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x, noise, labels)
    assert set(variables) == {"params"}
    assert variables["params"]["label_embed"]["embedding"].shape == (4, 8)  # 3 classes + null
    out = apply(variables, x, noise, labels)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(out)) and float(jnp.max(jnp.abs(out))) < 1e-2


def test_conditional_shape_dtype_and_labels(cond):
    model, params, apply = cond
    x, noise, labels = _inputs(4)
    out = apply(params, x, noise, labels)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    # Null label accepted; labels change the output; None means all-null.
    null = jnp.full((4,), 3, jnp.int32)
    out_null = apply(params, x, noise, null)
    out_zero = apply(params, x, noise, jnp.zeros((4,), jnp.int32))
    assert np.all(np.isfinite(out_null))
    assert not np.allclose(out_null, out_zero)
    np.testing.assert_allclose(apply(params, x, noise, None), out_null, rtol=1e-5, atol=1e-5)


def test_unconditional_shape_dtype():
    model = DDPMpp(num_classes=None, **TINY)
    params = _o1_params(model)
    assert "label_embed" not in params["params"]
    x, noise, _ = _inputs(2)
    out = jax.jit(model.apply)(params, x, noise)
    assert out.shape == x.shape and out.dtype == jnp.float32 and np.all(np.isfinite(out))


def test_examples_are_independent(cond):
    """Changing example j leaves the other outputs unchanged, and d out[i] / d x[j] is exactly
    zero for j != i: no op crosses the batch axis (BatchNorm-like statistics would fail)."""
    model, params, apply = cond
    x, noise, labels = _inputs(4)
    out = apply(params, x, noise, labels)
    assert float(jnp.std(out)) > 1e-2  # non-trivial output, so the checks below mean something
    x2 = x.at[3].set(10.0 * x[0] + 3.0)
    out2 = apply(params, x2, noise.at[3].set(5.0), labels.at[3].set((labels[3] + 1) % 4))
    np.testing.assert_allclose(out2[:3], out[:3], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out2[3], out[3])
    # Exact zero cross-Jacobian: d out[0] / d x[j] == 0 for j != 0.
    grad = jax.grad(lambda xx: apply(params, xx, noise, labels)[0].sum())(x)
    assert np.all(np.asarray(grad[1:]) == 0.0) and np.any(np.asarray(grad[0]) != 0.0)


def test_dropout_only_in_training(cond):
    _, params, apply_eval = cond
    model = DDPMpp(num_classes=3, dropout=0.5, **TINY)  # same parameters as the fixture's
    x, noise, labels = _inputs(4)
    # Eval mode needs no 'dropout' rng (tracing would raise otherwise; no compile needed).
    assert jax.eval_shape(model.apply, params, x, noise, labels).shape == x.shape
    ev = apply_eval(params, x, noise, labels)
    train = jax.jit(lambda p, k: model.apply(p, x, noise, labels, train=True, rngs={"dropout": k}))
    tr = train(params, jax.random.key(3, impl="rbg"))
    assert tr.shape == ev.shape and not np.allclose(tr, ev)


def test_initialisations_match_the_reference_network():
    """Each layer kind starts at the reference DDPM++'s scale, not just with its shapes.

    Label table N(0, 1) (PyTorch nn.Embedding; Flax's default std 1/sqrt(nf) made the label ~5x
    weaker than the noise embedding it is added to), attention q/k/v Xavier-uniform at scale 0.1,
    ordinary convs and dense layers Xavier-uniform at scale 1, zero-init branch ends ~1e-5.
    """
    model = DDPMpp(image_size=8, in_channels=1, num_classes=999, nf=32, ch_mult=(1, 2),
                   num_res_blocks=1, attn_resolutions=(4,))
    x, noise = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x, noise, jnp.zeros((1,), jnp.int32))["params"]

    def xavier_std(kernel, scale):
        fan_in, fan_out = math.prod(kernel.shape[:-1]), math.prod(kernel.shape[:-2]) * kernel.shape[-1]
        return math.sqrt(2 * scale / (fan_in + fan_out))

    table = np.asarray(params["label_embed"]["embedding"])
    assert table.shape == (1000, 32) and abs(table.std() - 1.0) < 0.03 and abs(table.mean()) < 0.03
    for name in ("q", "k", "v"):
        kernel = np.asarray(params["mid_attn"][name]["kernel"])
        np.testing.assert_allclose(kernel.std(), xavier_std(kernel, 0.1), rtol=0.1)
    for module, name in (("conv_in", None), ("emb_dense0", None), ("down0_res0", "conv0"),
                         ("down0_res0", "emb_proj")):
        kernel = np.asarray((params[module][name] if name else params[module])["kernel"])
        np.testing.assert_allclose(kernel.std(), xavier_std(kernel, 1.0), rtol=0.1)
    for module, name in (("down0_res0", "conv1"), ("mid_attn", "out"), ("conv_out", None)):
        kernel = np.asarray((params[module][name] if name else params[module])["kernel"])
        assert kernel.std() < 1e-4 * xavier_std(kernel, 1.0)


def test_sinusoidal_embedding_frequencies_span_one_to_one_over_max_period():
    from dpdm_jax.models.layers import sinusoidal_embedding

    t = jnp.array([0.3, -1.7])
    emb = np.asarray(sinusoidal_embedding(t, 8, 10000.0))
    freqs = 10000.0 ** -(np.arange(4) / 3)  # 1 ... 1e-4, both ends included
    np.testing.assert_allclose(emb, np.concatenate([np.sin(np.outer(t, freqs)), np.cos(np.outer(t, freqs))], 1),
                               rtol=1e-5, atol=1e-6)


def test_config_conv_impl_is_validated_from_the_registry_and_reaches_the_model():
    from configs import test_tiny
    from dpdm_jax import experiment
    from dpdm_jax.models import CONV_IMPLS, onednn

    config = test_tiny.get_config()
    assert config.model.conv_impl == "auto"
    config.model.conv_impl = "cudnn"
    with pytest.raises(ValueError, match=r"model\.conv_impl must be one of"):
        experiment.validate_config(config)
    for impl in CONV_IMPLS:
        if impl == "onednn" and not onednn.available():  # needs g++ and libdnnl-dev
            continue
        config.model.conv_impl = impl
        experiment.validate_config(config)
        assert experiment.build_model(config).conv_impl == impl


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape,groups", [((3, 14, 14, 64), 16), ((2, 7, 7, 12), 3), ((2, 4, 4, 1), 1)])
def test_group_norm_matches_flax_values_gradients_and_per_example_gradients(shape, groups, silu, kernel):
    """layers.GroupNorm (per-channel sums, then per-group; or the CPU kernel) [+ SiLU] ==
    flax.linen.GroupNorm [+ SiLU]: same parameter tree, same outputs, input and parameter gradients,
    and vmapped per-example gradients."""
    import flax.linen as nn

    from dpdm_jax.models import onednn
    from dpdm_jax.models.layers import GroupNorm

    if kernel and not onednn.available():
        pytest.skip(f"CPU kernels unavailable: {onednn.unavailable_reason()}")
    ours, flax_gn = GroupNorm(groups, silu=silu, kernel=kernel), nn.GroupNorm(num_groups=groups, epsilon=1e-6)
    ref = nn.Sequential([flax_gn, jax.nn.silu]) if silu else flax_gn
    kx, kp, kc = jax.random.split(jax.random.key(0), 3)
    x = 3.0 * jax.random.normal(kx, shape) + 1.5  # a non-zero mean, as after a convolution
    assert jax.tree.map(jnp.shape, ours.init(kp, x)) == jax.tree.map(jnp.shape, flax_gn.init(kp, x))
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(kp, a.shape), flax_gn.init(kp, x))
    ref_params = {"params": {"layers_0": params["params"]}} if silu else params
    cot = jax.random.normal(kc, shape)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(ref_params, x), atol=2e-5)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)) * cot[: x.shape[0]])

    batch_grads = lambda module, p: jax.grad(loss(module), argnums=(0, 1))(p, x)
    # Per-example (DP-SGD's vmap of grad), each example a batch of one row.
    example_grads = lambda module, p: jax.vmap(jax.grad(loss(module), argnums=(0, 1)), in_axes=(None, 0))(
        p, x[:, None])
    for grads in (batch_grads, example_grads):
        for a, b in zip(jax.tree.leaves(grads(ours, params)), jax.tree.leaves(grads(ref, ref_params)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_group_norm_kernel_gradient_with_cotangents_mapped_over_a_shared_input():
    """vmap over cotangents only (x, its statistics shared): the kernel's backward must broadcast x
    to the mapped rows, not read or write past them (it once left part of dx unwritten)."""
    from dpdm_jax.models import onednn

    if not onednn.available():
        pytest.skip(f"CPU kernels unavailable: {onednn.unavailable_reason()}")
    x = 2.0 * jax.random.normal(jax.random.key(0), (2, 4, 4, 8)) + 1.0
    scale, bias = 1.0 + 0.1 * jnp.arange(8.0), 0.05 * jnp.arange(8.0)
    _, vjp = jax.vjp(lambda x, s, b: onednn.group_norm(x, s, b, 2, 1e-6, silu=True), x, scale, bias)
    cotangents = jax.random.normal(jax.random.key(1), (3,) + x.shape)
    mapped = jax.vmap(vjp)(cotangents)
    for i, c in enumerate(cotangents):
        for a, b in zip(mapped, vjp(c), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-6)
