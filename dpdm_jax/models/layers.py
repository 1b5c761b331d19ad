"""Building blocks of the DDPM++ (NCSN++) U-Net, in Flax linen.

All tensors are NHWC. Every operation acts on each example separately (GroupNorm and
attention reduce over H, W, C of one example only), which DP-SGD's per-example gradients
require: nothing here mixes rows of the batch, and the only variable collection is 'params'.
"""
from __future__ import annotations

import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import custom_batching, lax

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


def group_norm(channels: int, name: str | None = None) -> nn.GroupNorm:
    """Per-example GroupNorm with min(C // 4, 32) groups and eps 1e-6."""
    return nn.GroupNorm(num_groups=num_groups(channels), epsilon=1e-6, name=name)


# --------------------------------------------------------------------------- convolutions
# Two implementations of the same convolution (same parameters, same values):
#   "xla":         lax.conv_general_dilated and its own autodiff.
#   "split_wgrad": the same forward and input gradient, but the weight gradient is computed
#                  in groups of rows, and per example when vmapped (DP-SGD's per-example
#                  gradients). On XLA:CPU, (a) vmap of the weight gradient becomes one
#                  grouped convolution (feature_group_count = batch) that ran 2-5x slower
#                  than separate convolutions, and (b) one weight-gradient convolution over
#                  many rows ran up to 3x slower than the sum of the same convolution over
#                  groups of rows that fit in cache (docs/benchmarks.md).
# "auto" picks split_wgrad on CPU and xla elsewhere (GPU convolution libraries handle both
# cases). Chosen when a module is traced; override with DPDM_CONV_IMPL or set_conv_impl().
CONV_IMPLS = ("auto", "xla", "split_wgrad")
_conv_impl = os.environ.get("DPDM_CONV_IMPL", "auto")
# Rows per weight-gradient group: as many as fit in this many bytes of input activations.
WGRAD_GROUP_BYTES = 1 << 20
_DIMS = ("NHWC", "HWIO", "NHWC")


def set_conv_impl(name: str) -> None:
    """Select the convolution implementation for modules traced from now on."""
    global _conv_impl
    if name not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {name!r}")
    _conv_impl = name


def conv_impl() -> str:
    """The implementation in use ("xla" or "split_wgrad"), "auto" resolved by backend."""
    if _conv_impl not in CONV_IMPLS:
        raise ValueError(f"DPDM_CONV_IMPL must be one of {CONV_IMPLS}, got {_conv_impl!r}")
    if _conv_impl == "auto":
        return "split_wgrad" if jax.default_backend() == "cpu" else "xla"
    return _conv_impl


def _conv(x, w, padding):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_DIMS)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _split_wgrad_conv(x, w, padding):
    return _conv(x, w, padding)


def _split_wgrad_fwd(x, w, padding):
    return _conv(x, w, padding), (x, w)


def _split_wgrad_bwd(padding, residuals, g):
    x, w = residuals
    _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, padding), x)
    return vjp_x(g)[0], _weight_grad_fn(padding)(x, g, w)


_split_wgrad_conv.defvjp(_split_wgrad_fwd, _split_wgrad_bwd)


def split_wgrad_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                     rhs_dilation=None, dimension_numbers=None,
                                     feature_group_count=1, precision=None, **unused):
    """Drop-in for lax.conv_general_dilated as nn.Conv calls it (stride 1, NHWC/HWIO only)."""
    ones = lambda v: v is None or all(int(d) == 1 for d in v)
    if not (ones(window_strides) and ones(lhs_dilation) and ones(rhs_dilation)
            and feature_group_count == 1 and lhs.ndim == 4):
        raise NotImplementedError("split_wgrad supports plain stride-1 2-D convolutions only")
    if dimension_numbers is not None:
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        if dn != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMS):
            raise NotImplementedError(f"split_wgrad expects NHWC/HWIO, got {dimension_numbers}")
    if not isinstance(padding, str):
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _split_wgrad_conv(lhs, rhs, padding)


def _conv_fn():
    return split_wgrad_conv_general_dilated if conv_impl() == "split_wgrad" else None


def conv3x3(features: int, init=default_init, name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding="SAME", kernel_init=init, bias_init=zeros, name=name,
                   conv_general_dilated=_conv_fn())


def conv1x1(features: int, init=default_init, name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (1, 1), kernel_init=init, bias_init=zeros, name=name,
                   conv_general_dilated=_conv_fn())


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

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        assert not (self.up and self.down)
        in_ch = x.shape[-1]
        h = nn.silu(group_norm(in_ch, name="norm0")(x))
        if self.up:
            h, x = upsample(h), upsample(x)
        elif self.down:
            h, x = downsample(h), downsample(x)
        h = conv3x3(self.out_ch, name="conv0")(h)
        # Noise/label conditioning as a per-channel bias, broadcast over H and W.
        h = h + nn.Dense(self.out_ch, kernel_init=default_init, bias_init=zeros,
                         name="emb_proj")(nn.silu(emb))[:, None, None, :]
        h = nn.silu(group_norm(self.out_ch, name="norm1")(h))
        if self.dropout > 0:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv3x3(self.out_ch, init=near_zero_init, name="conv1")(h)
        if in_ch != self.out_ch or self.up or self.down:
            x = conv1x1(self.out_ch, name="skip")(x)
        return (x + h) / math.sqrt(2.0)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each example.

    x: (B, H, W, C) -> (B, H, W, C). GN, then 1x1 projections q, k, v (each C*C + C params),
    softmax(q k^T / sqrt(C)) v, 1x1 output projection (near-zero init), out = (x + h) / sqrt(2).
    q, k, v start at Xavier-uniform scale 0.1 (the reference's NIN default), the output near zero.
    """

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = group_norm(c, name="norm")(x)
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
