"""Building blocks of the DDPM++ (NCSN++) U-Net, in Flax linen.

All tensors are NHWC. Every operation acts on each example separately (GroupNorm and
attention reduce over H, W, C of one example only), which DP-SGD's per-example gradients
require: nothing here mixes rows of the batch, and the only variable collection is 'params'.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

# Xavier-uniform for ordinary layers; the same shape scaled to a std of ~1e-5 for layers
# whose output should start near zero (last conv of each residual branch, attention output,
# head), so every block starts close to a (scaled) identity map.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
near_zero_init = nn.initializers.variance_scaling(1e-10, "fan_avg", "uniform")
zeros = nn.initializers.zeros


def num_groups(channels: int) -> int:
    """GroupNorm groups: min(C // 4, 32), at least 1."""
    return max(1, min(channels // 4, 32))


def group_norm(channels: int, name: str | None = None) -> nn.GroupNorm:
    """Per-example GroupNorm with min(C // 4, 32) groups and eps 1e-6."""
    return nn.GroupNorm(num_groups=num_groups(channels), epsilon=1e-6, name=name)


def conv3x3(features: int, init=default_init, name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding="SAME", kernel_init=init, bias_init=zeros, name=name)


def conv1x1(features: int, init=default_init, name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (1, 1), kernel_init=init, bias_init=zeros, name=name)


def downsample(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 mean pooling, stride 2: (B, H, W, C) -> (B, H/2, W/2, C). H and W must be even."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample(x: jnp.ndarray) -> jnp.ndarray:
    """Nearest-neighbour 2x up-sampling: (B, H, W, C) -> (B, 2H, 2W, C)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def sinusoidal_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
    """Transformer-style sinusoidal embedding of scalars.

    t: (B,) float -> (B, dim): [cos(t * f_i), sin(t * f_i)] with f_i = max_period^(-i/(dim/2)),
    i = 0 .. dim/2 - 1. dim must be even. No parameters.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


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
    """

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = group_norm(c, name="norm")(x)
        # A Dense on the channel axis is exactly a 1x1 convolution.
        proj = lambda name, init=default_init: nn.Dense(c, kernel_init=init, bias_init=zeros, name=name)
        q = proj("q")(h).reshape(b, hh * ww, c)
        k = proj("k")(h).reshape(b, hh * ww, c)
        v = proj("v")(h).reshape(b, hh * ww, c)
        logits = jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5)
        weights = nn.softmax(logits, axis=-1)
        h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, hh, ww, c)
        h = proj("out", near_zero_init)(h)
        return (x + h) / math.sqrt(2.0)
