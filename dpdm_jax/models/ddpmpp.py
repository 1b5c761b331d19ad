"""DDPM++ (NCSN++) U-Net of DPDM (design/method.md section 3), in Flax linen.

The network is F_theta in D(x) = c_skip x + c_out F_theta(c_in x, c_noise, y): it maps a
(B, H, W, C) image, the (B,) noise labels c_noise(sigma) and optional (B,) class labels to a
(B, H, W, C) output. Per-example only (no BatchNorm, no cross-example ops); 'params' only.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpdm_jax.data.readers import SPECS  # the dataset table
from dpdm_jax.models.layers import (
    AttnBlock,
    ResBlock,
    check_conv_impl,
    conv3x3,
    default_init,
    group_norm,
    label_embedding_init,
    near_zero_init,
    sinusoidal_embedding,
    zeros,
)


class DDPMpp(nn.Module):
    """DDPM++ U-Net.

    Fields: image_size (H = W), in_channels (C, also the output channels), num_classes
    (None = unconditional: no label table, class_labels ignored), nf (base width; the
    embedding MLP is 4 nf wide), ch_mult (width multiplier per resolution level),
    num_res_blocks (per level on the down path; the up path uses one more), attn_resolutions
    (spatial sizes with self-attention; the middle always has one), dropout (residual blocks,
    train=True only), max_period (of the sinusoidal noise embedding), conv_impl (how the
    convolutions are computed, one of layers.CONV_IMPLS: speed only, same parameters and
    values; "auto" picks by backend when traced).
    """

    image_size: int
    in_channels: int
    num_classes: int | None
    nf: int = 32
    ch_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    dropout: float = 0.0
    max_period: float = 10000.0
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, train: bool = False):
        """x: (B, H, W, C) float32; noise_labels: (B,) float32 (= c_noise(sigma));
        class_labels: (B,) int32 in [0, num_classes], num_classes being the null label
        (None on a conditional model means all-null). Returns (B, H, W, C) float32."""
        b, height, width, c = x.shape
        assert height == width == self.image_size and c == self.in_channels, x.shape
        assert self.image_size % 2 ** (len(self.ch_mult) - 1) == 0, "image_size not divisible"
        nf, num_levels = self.nf, len(self.ch_mult)
        check_conv_impl(self.conv_impl)

        # Conditioning: sinusoidal(c_noise) [+ label embedding] -> Dense, SiLU, Dense (4 nf).
        emb = sinusoidal_embedding(noise_labels, nf, self.max_period)
        if self.num_classes is not None:
            if class_labels is None:
                class_labels = jnp.full((b,), self.num_classes, jnp.int32)
            # N(0, 1) rows, as PyTorch's nn.Embedding in the reference network: Flax's default
            # (std 1/sqrt(nf)) made the label ~5x weaker than the noise embedding it is added to.
            table = nn.Embed(self.num_classes + 1, nf, embedding_init=label_embedding_init,
                             name="label_embed")
            emb = emb + table(class_labels.astype(jnp.int32))
        emb = nn.Dense(4 * nf, kernel_init=default_init, bias_init=zeros, name="emb_dense0")(emb)
        emb = nn.Dense(4 * nf, kernel_init=default_init, bias_init=zeros,
                       name="emb_dense1")(nn.silu(emb))

        res_block = lambda ch, name, **kw: ResBlock(ch, dropout=self.dropout, conv_impl=self.conv_impl,
                                                   name=name, **kw)

        # Down path; every intermediate output is kept as a skip for the up path.
        h = conv3x3(nf, self.conv_impl, name="conv_in")(x)
        skips = [h]
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = res_block(nf * mult, f"down{level}_res{i}")(h, emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(conv_impl=self.conv_impl, name=f"down{level}_attn{i}")(h)
                skips.append(h)
            if level != num_levels - 1:
                h = res_block(h.shape[-1], f"down{level}_resample", down=True)(h, emb, train)
                skips.append(h)

        # Middle (always with attention).
        h = res_block(h.shape[-1], "mid_res0")(h, emb, train)
        h = AttnBlock(conv_impl=self.conv_impl, name="mid_attn")(h)
        h = res_block(h.shape[-1], "mid_res1")(h, emb, train)

        # Up path: num_res_blocks + 1 blocks per level, each consuming one skip.
        for level in reversed(range(num_levels)):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res_block(nf * self.ch_mult[level], f"up{level}_res{i}")(h, emb, train)
            if h.shape[1] in self.attn_resolutions:
                h = AttnBlock(conv_impl=self.conv_impl, name=f"up{level}_attn")(h)
            if level != 0:
                h = res_block(h.shape[-1], f"up{level}_resample", up=True)(h, emb, train)
        assert not skips

        # Head.
        h = group_norm(h.shape[-1], name="norm_out", silu=True, conv_impl=self.conv_impl)(h)
        return conv3x3(self.in_channels, self.conv_impl, init=near_zero_init, name="conv_out")(h)


# Per-dataset fields of the paper's five networks (everything else is the DDPMpp default).
# Network presets per dataset; image size, channels and classes come from the dataset table (data.SPECS).
_CONFIGS: dict[str, dict[str, Any]] = {
    "mnist": dict(attn_resolutions=(7,)),
    "fashion_mnist": dict(attn_resolutions=(7,)),
    "cifar10": dict(attn_resolutions=(16,)),
    "celeba32": dict(attn_resolutions=(8, 16)),
    "celeba64": dict(ch_mult=(1, 1, 2, 2), attn_resolutions=(8, 16)),
    "imagenet32": dict(attn_resolutions=(8, 16)),
}


def ddpmpp_for(dataset: str, **overrides) -> DDPMpp:
    """The paper's DDPM++ for `dataset` (one of mnist, fashion_mnist, cifar10, celeba32,
    celeba64, imagenet32), with any DDPMpp field overridden by keyword."""
    key = dataset.lower().replace("-", "_")
    if key not in _CONFIGS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(_CONFIGS)}")
    size, _, channels = SPECS[key].image_shape
    fields = {"image_size": size, "in_channels": channels, "num_classes": SPECS[key].num_classes,
              **_CONFIGS[key], **overrides}
    for name in ("ch_mult", "attn_resolutions"):  # hashable, so the module can be static
        if name in fields:
            fields[name] = tuple(fields[name])
    return DDPMpp(**fields)


def count_params(params) -> int:
    """Total number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))


def dummy_inputs(model: DDPMpp, batch: int = 1):
    """(x, c_noise, labels) of the right shapes for `model.init`: the one place they are written."""
    x = jnp.zeros((batch, model.image_size, model.image_size, model.in_channels), jnp.float32)
    c_noise = jnp.zeros((batch,), jnp.float32)
    labels = None if model.num_classes is None else jnp.zeros((batch,), jnp.int32)
    return x, c_noise, labels


def init_shapes(model: DDPMpp, batch: int = 1):
    """Variable shapes of `model` (a pytree of ShapeDtypeStruct) via jax.eval_shape: no compute."""
    inputs = dummy_inputs(model, batch)
    return jax.eval_shape(lambda k: model.init(k, *inputs), jax.random.key(0))


def init_variables(model: DDPMpp, key: jax.Array) -> dict:
    """Initial variables from a PRNG key (derive it from the run key: `dp.init_key`).

    Not from an integer seed: jax.random.key(seed) keeps only its low 32 bits, so the initial
    parameters (public in the usual threat model) would reveal them. The key is turned into an
    'rbg' key by the PRF (XLA:CPU compiles 'rbg' initialisers ~4x faster).
    """
    if not isinstance(key, jax.Array) or not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise TypeError(f"init_variables needs a typed PRNG key (e.g. dp.init_key(run key)), got {type(key).__name__}")
    inputs = dummy_inputs(model)

    def init(k):
        rbg = jax.random.wrap_key_data(jax.random.bits(k, (4,), jnp.uint32), impl="rbg")
        return model.init(rbg, *inputs)

    return jax.jit(init)(key)
