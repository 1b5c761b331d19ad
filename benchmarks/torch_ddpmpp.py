"""PyTorch port of dpdm_jax's DDPM++ U-Net, for benchmarking against Opacus only.

Same layers, shapes, order and parameter count as `dpdm_jax.models.DDPMpp` (see
`dpdm_jax/models/ddpmpp.py` and `layers.py`); module names match the Flax ones, so Flax
parameters can be loaded (`load_flax_params`) and the outputs compared. The attention
projections are nn.Linear on (B, H*W, C) and GroupNorm is nn.GroupNorm, so Opacus computes
per-sample gradients with its own grad samplers (Conv2d, Linear, GroupNorm, Embedding).

Benchmark-only: torch is never a runtime dependency of dpdm_jax.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def num_groups(channels: int) -> int:
    return max(1, min(channels // 4, 32))


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels, eps=1e-6)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, up: bool = False, down: bool = False):
        super().__init__()
        self.up, self.down = up, down
        self.norm0 = group_norm(in_ch)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm1 = group_norm(out_ch)
        self.conv1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if (in_ch != out_ch or up or down) else None

    def forward(self, x, emb):
        h = F.silu(self.norm0(x))
        if self.up:
            h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
        elif self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.conv0(h)
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv1(F.silu(self.norm1(h)))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) / math.sqrt(2.0)


class AttnBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.q, self.k, self.v, self.out = (nn.Linear(ch, ch) for _ in range(4))

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(b, hh * ww, c)
        q, k, v = self.q(h), self.k(h), self.v(h)
        w = torch.softmax(torch.einsum("bqc,bkc->bqk", q, k) * c ** -0.5, dim=-1)
        h = self.out(torch.einsum("bqk,bkc->bqc", w, v))
        return (x + h.reshape(b, hh, ww, c).permute(0, 3, 1, 2)) / math.sqrt(2.0)


class DDPMpp(nn.Module):
    """Mirror of dpdm_jax.models.DDPMpp (NCHW instead of NHWC)."""

    def __init__(self, image_size: int, in_channels: int, num_classes: int | None, nf: int = 32,
                 ch_mult=(1, 2, 2), num_res_blocks: int = 2, attn_resolutions=(16,),
                 max_period: float = 10000.0):
        super().__init__()
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.nf, self.ch_mult, self.num_res_blocks = nf, tuple(ch_mult), num_res_blocks
        self.attn_resolutions, self.max_period = tuple(attn_resolutions), max_period
        emb_dim = 4 * nf
        m = nn.ModuleDict()
        if num_classes is not None:
            m["label_embed"] = nn.Embedding(num_classes + 1, nf)
        m["emb_dense0"] = nn.Linear(nf, emb_dim)
        m["emb_dense1"] = nn.Linear(emb_dim, emb_dim)
        m["conv_in"] = nn.Conv2d(in_channels, nf, 3, padding=1)
        # Walk the same plan as the Flax module, tracking channels and resolution.
        ch, res, skips = nf, image_size, [nf]
        levels = len(self.ch_mult)
        for level, mult in enumerate(self.ch_mult):
            for i in range(num_res_blocks):
                m[f"down{level}_res{i}"] = ResBlock(ch, nf * mult, emb_dim)
                ch = nf * mult
                if res in self.attn_resolutions:
                    m[f"down{level}_attn{i}"] = AttnBlock(ch)
                skips.append(ch)
            if level != levels - 1:
                m[f"down{level}_resample"] = ResBlock(ch, ch, emb_dim, down=True)
                res //= 2
                skips.append(ch)
        m["mid_res0"] = ResBlock(ch, ch, emb_dim)
        m["mid_attn"] = AttnBlock(ch)
        m["mid_res1"] = ResBlock(ch, ch, emb_dim)
        for level in reversed(range(levels)):
            for i in range(num_res_blocks + 1):
                m[f"up{level}_res{i}"] = ResBlock(ch + skips.pop(), nf * self.ch_mult[level], emb_dim)
                ch = nf * self.ch_mult[level]
            if res in self.attn_resolutions:
                m[f"up{level}_attn"] = AttnBlock(ch)
            if level != 0:
                m[f"up{level}_resample"] = ResBlock(ch, ch, emb_dim, up=True)
                res *= 2
        assert not skips
        m["norm_out"] = group_norm(ch)
        m["conv_out"] = nn.Conv2d(ch, in_channels, 3, padding=1)
        self.m = m

    def forward(self, x, noise_labels, class_labels=None):
        m, nf, levels = self.m, self.nf, len(self.ch_mult)
        emb = sinusoidal_embedding(noise_labels, nf, self.max_period)
        if self.num_classes is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + m["label_embed"](class_labels.long())
        emb = m["emb_dense1"](F.silu(m["emb_dense0"](emb)))
        h = m["conv_in"](x)
        skips = [h]
        for level in range(levels):
            for i in range(self.num_res_blocks):
                h = m[f"down{level}_res{i}"](h, emb)
                if f"down{level}_attn{i}" in m:
                    h = m[f"down{level}_attn{i}"](h)
                skips.append(h)
            if level != levels - 1:
                h = m[f"down{level}_resample"](h, emb)
                skips.append(h)
        h = m["mid_res1"](m["mid_attn"](m["mid_res0"](h, emb)), emb)
        for level in reversed(range(levels)):
            for i in range(self.num_res_blocks + 1):
                h = m[f"up{level}_res{i}"](torch.cat([h, skips.pop()], dim=1), emb)
            if f"up{level}_attn" in m:
                h = m[f"up{level}_attn"](h)
            if level != 0:
                h = m[f"up{level}_resample"](h, emb)
        return m["conv_out"](F.silu(m["norm_out"](h)))


def from_flax_module(model) -> DDPMpp:
    """A torch DDPMpp with the same fields as a dpdm_jax.models.DDPMpp instance."""
    return DDPMpp(model.image_size, model.in_channels, model.num_classes, nf=model.nf,
                  ch_mult=model.ch_mult, num_res_blocks=model.num_res_blocks,
                  attn_resolutions=model.attn_resolutions, max_period=model.max_period)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_flax_params(model: DDPMpp, flax_params) -> None:
    """Copy Flax parameters ({'conv_in': {'kernel': ...}, ...}, no 'params' wrapper) in place."""
    seen = 0

    def walk(tree, prefix):
        nonlocal seen
        for name, sub in tree.items():
            if isinstance(sub, dict) or hasattr(sub, "items"):
                walk(sub, prefix + [name])
                continue
            module = model.m
            for part in prefix:
                module = module[part] if isinstance(module, nn.ModuleDict) else getattr(module, part)
            a = np.asarray(sub)
            if name == "kernel" and a.ndim == 4:  # HWIO -> OIHW
                target, a = module.weight, a.transpose(3, 2, 0, 1)
            elif name == "kernel":  # (in, out) -> (out, in)
                target, a = module.weight, a.T
            elif name in ("scale", "embedding"):
                target = module.weight
            else:
                target = getattr(module, name)
            assert tuple(target.shape) == a.shape, (prefix, name, target.shape, a.shape)
            with torch.no_grad():
                target.copy_(torch.from_numpy(np.ascontiguousarray(a)))
            seen += a.size

    walk(flax_params, [])
    assert seen == count_params(model), (seen, count_params(model))
