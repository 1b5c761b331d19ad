"""Building blocks of the DDPM++ (NCSN++) U-Net, in Flax linen.

All tensors are NHWC. Every operation acts on each example separately (GroupNorm and
attention reduce over H, W, C of one example only), which DP-SGD's per-example gradients
require: nothing here mixes rows of the batch, and the only variable collection is 'params'.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import custom_batching, lax

import dpdm_jax.models.onednn as onednn  # noqa: PLR0402  (not via the package: no import cycle)

# Xavier-uniform for ordinary layers; the same shape scaled to a std of ~1e-5 for layers
# whose output should start near zero (last conv of each residual branch, attention output,
# head), so every block starts close to a (scaled) identity map.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
near_zero_init = nn.initializers.variance_scaling(1e-10, "fan_avg", "uniform")
# Attention's q, k, v projections: the reference network's 1x1 "NIN" layers default to scale 0.1.
attn_qkv_init = nn.initializers.variance_scaling(0.1, "fan_avg", "uniform")
# Class-label table: standard normal rows (PyTorch's nn.Embedding default, as in the reference).
label_embedding_init = nn.initializers.normal(1.0)
zeros = nn.initializers.zeros


def num_groups(channels: int) -> int:
    """GroupNorm groups: min(C // 4, 32), at least 1."""
    return max(1, min(channels // 4, 32))


class GroupNorm(nn.Module):
    """GroupNorm over (H, W, channels of a group) of each example, then SiLU if `silu`:
    (B, H, W, C) -> same shape.

    The same parameters ('scale' ones, 'bias' zeros, each (C,)) and values as flax.linen.GroupNorm
    (statistics in float32, variance as E[x^2] - E[x]^2 clipped at 0), computed in an order that
    XLA:CPU runs about twice as fast on NHWC activations: per-channel sums over H and W (C stays
    the minor axis, so the reductions vectorise), then per-group sums of those small (B, C)
    arrays, then one multiply-add per element with per-channel coefficients. Flax's form reduces
    over a (B, H, W, G, C/G) view, which XLA:CPU lowered to slow strided reductions in the forward
    and backward passes (docs/benchmarks.md section 14). `kernel`: the same values from the CPU
    kernel of models/kernels/group_norm.cc (two passes over each row each way, SiLU fused; used
    with conv_impl="onednn", whose library it is built into).
    """

    num_groups: int
    epsilon: float = 1e-6
    silu: bool = False
    kernel: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, height, width, c = x.shape
        g = self.num_groups
        assert c % g == 0, (c, g)
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        if self.kernel:
            return onednn.group_norm(x, scale, bias, g, self.epsilon, self.silu)
        xf = x.astype(jnp.float32)
        count = height * width * (c // g)
        group_sum = lambda per_channel: per_channel.reshape(b, g, c // g).sum(-1)  # (B, C) -> (B, G)
        mean = group_sum(jnp.sum(xf, axis=(1, 2))) / count
        var = jnp.maximum(group_sum(jnp.sum(xf * xf, axis=(1, 2))) / count - mean * mean, 0.0)
        per_channel = lambda per_group: jnp.repeat(per_group, c // g, axis=-1)  # (B, G) -> (B, C)
        mul = scale * per_channel(lax.rsqrt(var + self.epsilon))
        add = bias - per_channel(mean) * mul
        y = xf * mul[:, None, None, :] + add[:, None, None, :]
        return (nn.silu(y) if self.silu else y).astype(x.dtype)


def group_norm(channels: int, name: str | None = None, *, silu: bool = False, conv_impl: str = "xla") -> GroupNorm:
    """Per-example GroupNorm with min(C // 4, 32) groups and eps 1e-6 [then SiLU]; computed by the
    CPU kernel where `conv_impl` resolves to "onednn"."""
    kernel = resolve_conv_impl(conv_impl) == "onednn"
    return GroupNorm(num_groups=num_groups(channels), epsilon=1e-6, silu=silu, kernel=kernel, name=name)


# --------------------------------------------------------------------------- convolutions
# Implementations of the same convolution (same parameters, same values), chosen per model by
# DDPMpp.conv_impl (this registry is what the config check and the tests read):
#   "xla":           lax.conv_general_dilated and its own autodiff.
#   "split_wgrad":   XLA's forward and input gradient; the weight gradient computed in groups of
#                    rows, and one convolution per example when vmapped (DP-SGD's per-example
#                    gradients). On XLA:CPU, (a) vmap of the weight gradient becomes one grouped
#                    convolution (feature_group_count = batch) that ran 2-5x slower than separate
#                    convolutions, and (b) one weight-gradient convolution over many rows ran up
#                    to 3x slower than the sum over groups of rows that fit in cache.
#   "patches_wgrad": XLA's forward and input gradient; the weight gradient as patches^T @ g, a
#                    matrix product ((kh kw Cin, rows H W) @ (rows H W, Cout)), a batched one
#                    when vmapped.
#   "patches":       every pass a matrix product over patches: forward patches(x) @ W, input
#                    gradient patches(g) @ flip(W)^T, weight gradient as in patches_wgrad.
#   "per_shape":     what measured fastest per layer shape on XLA:CPU: 1x1 convolutions as
#                    "patches" (plain matrix products), the others as "split_wgrad".
#   "onednn":        CPU only: oneDNN's kernels as XLA custom calls (models/onednn.py; needs g++
#                    and libdnnl-dev): forward, input gradient, and one weight gradient per example
#                    when vmapped. Measured fastest on CPU in every pass and layer shape, and
#                    20-57 % more rows/s for the whole step (docs/benchmarks.md section 11). The
#                    network's GroupNorms (+ SiLU) then run as the CPU kernel built into the same
#                    library (GroupNorm(kernel=True); section 14).
# "auto" resolves by backend when a module is traced (resolve_conv_impl). docs/benchmarks.md
# has the per-layer and whole-step measurements behind the CPU choice.
CONV_IMPLS = ("auto", "xla", "split_wgrad", "patches_wgrad", "patches", "per_shape", "onednn")
AUTO_CONV_IMPL = {"cpu": "onednn"}  # backend -> implementation; any other backend: "xla"
# "auto" on CPU where the oneDNN kernels cannot be built, or where several CPU devices share one
# process (fake devices in tests: each would start its own oneDNN thread team on the same cores).
AUTO_CPU_FALLBACK = "split_wgrad"
# Rows per weight-gradient group (split_wgrad): as many as fit in this many bytes of input.
WGRAD_GROUP_BYTES = 1 << 20
_DIMS = ("NHWC", "HWIO", "NHWC")


def check_conv_impl(name: str) -> str:
    """`name` if it is one of CONV_IMPLS, else ValueError."""
    if name not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {name!r}")
    return name


def resolve_conv_impl(name: str) -> str:
    """The implementation `name` stands for on the default backend ("auto" resolved)."""
    if check_conv_impl(name) != "auto":
        return name
    impl = AUTO_CONV_IMPL.get(jax.default_backend(), "xla")
    if impl == "onednn" and (jax.local_device_count() > 1 or not onednn.available()):
        return AUTO_CPU_FALLBACK
    return impl


def _conv(x, w, padding):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_DIMS)


def _explicit_padding(padding, kernel_hw, in_hw):
    """((lo, hi), (lo, hi)) for a stride-1 convolution."""
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(in_hw, kernel_hw, (1, 1), padding))
    return tuple(padding)


def _patches(x, kernel_hw, padding):
    """(N, H, W, C) -> (N, H', W', kh kw C): the (dy, dx, c)-ordered windows of a stride-1 conv."""
    (kh, kw), pads = kernel_hw, _explicit_padding(padding, kernel_hw, x.shape[1:3])
    if (kh, kw) == (1, 1) and pads == ((0, 0), (0, 0)):
        return x
    xp = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    return jnp.concatenate([xp[:, dy:dy + ho, dx:dx + wo, :] for dy in range(kh) for dx in range(kw)],
                           axis=-1)


def _patches_conv(x, w, padding):
    """conv(x, w) as patches(x) @ W (W: HWIO reshaped to (kh kw Cin, Cout))."""
    kh, kw, cin, cout = w.shape
    p = _patches(x, (kh, kw), padding)
    return lax.dot_general(p, w.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())))


def _patches_weight_grad(x, g, w, padding):
    """d/dw of sum(g * conv(x, w)) = patches(x)^T @ g over all rows, as HWIO."""
    kh, kw, cin, cout = w.shape
    p = _patches(x, (kh, kw), padding)
    gw = lax.dot_general(p, g, (((0, 1, 2), (0, 1, 2)), ((), ())))
    return gw.reshape(kh, kw, cin, cout).astype(w.dtype)


def _patches_input_grad(g, w, padding, x):
    """d/dx of sum(g * conv(x, w)): the full convolution of g with the flipped, transposed kernel."""
    kh, kw = w.shape[:2]
    pads = _explicit_padding(padding, (kh, kw), x.shape[1:3])
    back = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), pads))
    return _patches_conv(g, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), back)


def _weight_grad_rows(x, g, w, padding):
    """d/dw of sum(g * conv(x, w)) for rows x (N, H, W, C): a sum over groups of rows.

    w is only the linearisation point (its value is unused): it gives the result w's type,
    which inside shard_map includes its device-varying axes.
    """
    n = x.shape[0]
    row_bytes = max(1, math.prod(x.shape[1:]) * x.dtype.itemsize)
    group = max(1, min(n, WGRAD_GROUP_BYTES // row_bytes))
    total = None
    for start in range(0, n, group):
        rows = slice(start, min(n, start + group))
        _, vjp = jax.vjp(lambda w_: _conv(x[rows], w_, padding), w)
        part = vjp(g[rows])[0]
        total = part if total is None else total + part
    return total


@functools.lru_cache(maxsize=None)
def _weight_grad_fn(padding):
    """_weight_grad_rows whose vmap is a loop over the mapped axis (one gradient per example)."""

    @custom_batching.custom_vmap
    def weight_grad(x, g, w):
        return _weight_grad_rows(x, g, w, padding)

    @weight_grad.def_vmap
    def _batched(axis_size, in_batched, x, g, w):
        x, g, w = (a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
                   for a, batched in zip((x, g, w), in_batched))
        return jnp.stack([weight_grad(x[i], g[i], w[i]) for i in range(axis_size)]), True

    return weight_grad


def _xla_input_grad(g, w, padding, x):
    _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, padding), x)
    return vjp_x(g)[0]


# impl -> (forward, input gradient, weight gradient); "xla" uses lax.conv's own autodiff.
_PASSES = {
    "split_wgrad": (_conv, lambda g, w, padding, x: _xla_input_grad(g, w, padding, x),
                    lambda x, g, w, padding: _weight_grad_fn(padding)(x, g, w)),
    "patches_wgrad": (_conv, lambda g, w, padding, x: _xla_input_grad(g, w, padding, x),
                      _patches_weight_grad),
    "patches": (_patches_conv, _patches_input_grad,
                _patches_weight_grad),
}


def _pads(padding, w, x):
    return _explicit_padding(padding, w.shape[:2], x.shape[1:3])


_PASSES["onednn"] = (lambda x, w, padding: onednn.conv(x, w, _pads(padding, w, x)),
                     lambda g, w, padding, x: onednn.conv_input_grad(g, w, _pads(padding, w, x)),
                     lambda x, g, w, padding: onednn.conv_weight_grad(x, g, w, _pads(padding, w, x)))


def _per_shape(kernel_hw) -> str:
    return "patches" if tuple(kernel_hw) == (1, 1) else "split_wgrad"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _custom_conv(x, w, padding, impl):
    return _PASSES[impl][0](x, w, padding)


def _custom_conv_fwd(x, w, padding, impl):
    return _PASSES[impl][0](x, w, padding), (x, w)


def _custom_conv_bwd(padding, impl, residuals, g):
    x, w = residuals
    _, input_grad, weight_grad = _PASSES[impl]
    return input_grad(g, w, padding, x), weight_grad(x, g, w, padding)


_custom_conv.defvjp(_custom_conv_fwd, _custom_conv_bwd)


def custom_conv_general_dilated(impl: str):
    """A drop-in for lax.conv_general_dilated as nn.Conv calls it (stride 1, NHWC/HWIO only),
    computed by implementation `impl` (a key of _PASSES)."""

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, precision=None, **unused):
        ones = lambda v: v is None or all(int(d) == 1 for d in v)
        if not (ones(window_strides) and ones(lhs_dilation) and ones(rhs_dilation)
                and feature_group_count == 1 and lhs.ndim == 4):
            raise NotImplementedError(f"{impl} supports plain stride-1 2-D convolutions only")
        if dimension_numbers is not None:
            dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            if dn != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMS):
                raise NotImplementedError(f"{impl} expects NHWC/HWIO, got {dimension_numbers}")
        if not isinstance(padding, str):
            padding = tuple((int(lo), int(hi)) for lo, hi in padding)
        passes = _per_shape(rhs.shape[:2]) if impl == "per_shape" else impl
        return _custom_conv(lhs, rhs, padding, passes)

    return conv_general_dilated


def _conv_fn(impl: str):
    impl = resolve_conv_impl(impl)
    if impl == "onednn":
        onednn.require()  # builds the kernels once; one clear error before any compute if it cannot
    return None if impl == "xla" else custom_conv_general_dilated(impl)


def conv3x3(features: int, conv_impl: str, init=default_init, name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding="SAME", kernel_init=init, bias_init=zeros, name=name,
                   conv_general_dilated=_conv_fn(conv_impl))


def conv1x1(features: int, conv_impl: str, init=default_init, name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (1, 1), kernel_init=init, bias_init=zeros, name=name,
                   conv_general_dilated=_conv_fn(conv_impl))


def downsample(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 mean pooling, stride 2: (B, H, W, C) -> (B, H/2, W/2, C). H and W must be even."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample(x: jnp.ndarray) -> jnp.ndarray:
    """Nearest-neighbour 2x up-sampling: (B, H, W, C) -> (B, 2H, 2W, C)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def sinusoidal_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
    """Transformer-style sinusoidal embedding of scalars.

    t: (B,) float -> (B, dim): [sin(t * f_i), cos(t * f_i)] with f_i = max_period^(-i/(dim/2 - 1)),
    i = 0 .. dim/2 - 1, so the frequencies run from 1 down to exactly 1/max_period (as in the
    reference network). dim must be even and >= 4. No parameters.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ResBlock(nn.Module):
    """BigGAN-style residual block, optionally resampling by 2.

    x: (B, H, W, C_in), emb: (B, E) -> (B, H', W', out_ch), with H' = 2H (up), H/2 (down) or H.
    h = conv(drop(SiLU(GN(conv(resample(SiLU(GN(x)))) + Dense(SiLU(emb))))));
    out = (skip(resample(x)) + h) / sqrt(2), skip a 1x1 conv when channels change or
    the block resamples, identity otherwise.
    """

    out_ch: int
    up: bool = False
    down: bool = False
    dropout: float = 0.0
    conv_impl: str = "auto"  # one of CONV_IMPLS

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        assert not (self.up and self.down)
        in_ch = x.shape[-1]
        h = group_norm(in_ch, name="norm0", silu=True, conv_impl=self.conv_impl)(x)
        if self.up:
            h, x = upsample(h), upsample(x)
        elif self.down:
            h, x = downsample(h), downsample(x)
        h = conv3x3(self.out_ch, self.conv_impl, name="conv0")(h)
        # Noise/label conditioning as a per-channel bias, broadcast over H and W.
        h = h + nn.Dense(self.out_ch, kernel_init=default_init, bias_init=zeros,
                         name="emb_proj")(nn.silu(emb))[:, None, None, :]
        h = group_norm(self.out_ch, name="norm1", silu=True, conv_impl=self.conv_impl)(h)
        if self.dropout > 0:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv3x3(self.out_ch, self.conv_impl, init=near_zero_init, name="conv1")(h)
        if in_ch != self.out_ch or self.up or self.down:
            x = conv1x1(self.out_ch, self.conv_impl, name="skip")(x)
        return (x + h) / math.sqrt(2.0)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each example.

    x: (B, H, W, C) -> (B, H, W, C). GN, then 1x1 projections q, k, v (each C*C + C params),
    softmax(q k^T / sqrt(C)) v, 1x1 output projection (near-zero init), out = (x + h) / sqrt(2).
    q, k, v start at Xavier-uniform scale 0.1 (the reference's NIN default), the output near zero.
    """

    conv_impl: str = "auto"  # one of CONV_IMPLS: picks the GroupNorm's implementation here

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = group_norm(c, name="norm", conv_impl=self.conv_impl)(x)
        # A Dense on the channel axis is exactly a 1x1 convolution.
        proj = lambda name, init=attn_qkv_init: nn.Dense(c, kernel_init=init, bias_init=zeros, name=name)
        q = proj("q")(h).reshape(b, hh * ww, c)
        k = proj("k")(h).reshape(b, hh * ww, c)
        v = proj("v")(h).reshape(b, hh * ww, c)
        logits = jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5)
        weights = nn.softmax(logits, axis=-1)
        h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, hh, ww, c)
        h = proj("out", near_zero_init)(h)
        return (x + h) / math.sqrt(2.0)
