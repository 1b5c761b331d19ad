"""FID statistics and Frechet distance: closed forms, independent formulas, caching (no weights)."""
import os

import numpy as np
import pytest
import scipy.linalg

from dpdm_jax.evaluation import fid


def _random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


def _independent_fid(mu1, s1, mu2, s2):
    """Via the eigenvalues of the (non-symmetric) product S1 S2: tr sqrt = sum sqrt(lambda)."""
    lam = np.linalg.eigvals(s1 @ s2)
    assert np.all(np.abs(lam.imag) < 1e-8 * np.abs(lam).max())
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.sqrt(np.clip(lam.real, 0, None)).sum()


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_fid_of_a_set_with_itself_is_zero(method):
    rng = np.random.default_rng(0)
    feats = rng.gamma(2.0, 0.5, size=(400, 64)) @ rng.normal(size=(64, 64))
    mu, sigma = fid.feature_statistics(feats)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-8 * np.trace(sigma)


def test_fid_with_itself_rank_deficient_like_real_fid():
    """N < D (e.g. few samples of 2048-d features): singular covariance, still ~0."""
    rng = np.random.default_rng(1)
    mu, sigma = fid.feature_statistics(rng.normal(size=(50, 128)))
    assert np.linalg.matrix_rank(sigma) < 128
    for method in ("eigh", "sqrtm"):  # round-off of sqrt of ~0 eigenvalues: ~1e-8 relative
        assert abs(fid.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-6 * np.trace(sigma)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_diagonal_and_commuting_closed_form(method):
    rng = np.random.default_rng(2)
    d = 32
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(expected, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # commuting: same eigenvectors
    got = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T, method=method)
    assert got == pytest.approx(expected, rel=1e-9)


def test_one_dimensional_is_mean_and_std_difference():
    got = fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]])
    assert got == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2)


@pytest.mark.parametrize("d,rank", [(16, None), (64, None), (64, 20)])
def test_random_gaussians_match_independent_formulas(d, rank):
    rng = np.random.default_rng(d + (rank or 0))
    s1, s2 = _random_spd(rng, d, rank), _random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    ref = _independent_fid(mu1, s1, mu2, s2)
    # the symmetric form tr((sqrt(S2) S1 sqrt(S2))^{1/2}) with scipy's sqrtm
    r2 = scipy.linalg.sqrtm(s2).real
    ref2 = (np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2)
            - 2 * np.trace(scipy.linalg.sqrtm(r2 @ s1 @ r2).real))
    assert ref == pytest.approx(ref2, rel=1e-7)
    for method in ("eigh", "sqrtm"):
        assert fid.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(ref, rel=1e-7)
    # symmetric in its two arguments
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-7)


def test_fid_from_samples_converges_to_closed_form():
    rng = np.random.default_rng(3)
    d, n = 8, 200_000
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    x = rng.normal(size=(n, d)) * np.sqrt(a)
    y = rng.normal(size=(n, d)) * np.sqrt(b) + 0.5
    expected = d * 0.25 + np.sum(a + b - 2 * np.sqrt(a * b))
    got = fid.fid_from_stats(fid.feature_statistics(x), fid.feature_statistics(y))
    assert got == pytest.approx(expected, abs=0.02)


def test_streaming_statistics_equal_numpy_with_large_offset():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(1000, 20)) * 0.01 + 1e4  # cancellation-prone if done naively
    s = fid.FeatureStats(20)
    for chunk in np.array_split(feats, 7):
        s.update(chunk)
    mu, sigma = s.mean_cov()
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-7, atol=1e-12)
    mu0, sigma0 = s.mean_cov(ddof=0)
    np.testing.assert_allclose(sigma0, np.cov(feats, rowvar=False, ddof=0), rtol=1e-7, atol=1e-12)
    assert mu.dtype == sigma.dtype == np.float64


def test_shape_errors():
    with pytest.raises(ValueError):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="nope")
    with pytest.raises(ValueError):
        fid.FeatureStats(3).mean_cov()


class _FakeExtractor:
    """Stands in for the Inception network: a fixed random projection of the pixels to 16-d."""

    def __init__(self):
        self.calls = 0
        self.proj = np.random.default_rng(5).normal(size=(28 * 28, 16))

    def __call__(self, images, progress=None):
        self.calls += 1
        out = images.reshape(len(images), -1).astype(np.float32) @ self.proj / 255.0
        if progress:
            progress(len(images), len(images))
        return out.astype(np.float32)


def test_reference_statistics_are_cached(tmp_path):
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (30, 28, 28, 1), dtype=np.uint8)
    ext = _FakeExtractor()
    seen = []
    mu, sigma = fid.reference_statistics("toy", "train", images=lambda: images, extractor=ext,
                                         cache_dir=str(tmp_path), progress=lambda d, t: seen.append(d))
    cached = fid.stats_path("toy", "train", str(tmp_path), 30, fid.images_digest(images))
    assert os.path.exists(cached) and seen[-1] == 30
    calls = ext.calls

    mu2, sigma2 = fid.reference_statistics("toy", "train", images=images, extractor=ext,
                                           cache_dir=str(tmp_path))
    assert ext.calls == calls  # cache used: the network never ran
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    # generated images identical to the reference set: FID ~ 0 (chunked extraction too)
    stats = fid.image_statistics(images, ext, chunk=7)
    assert abs(fid.fid_from_stats(stats, (mu, sigma))) < 1e-6 * np.trace(sigma)
    # a stale file (other network) is recomputed
    fid.save_stats(cached, mu, sigma, network_sha256="0" * 64)
    fid.reference_statistics("toy", "train", images=images, extractor=ext, cache_dir=str(tmp_path))
    assert ext.calls > calls + 5


def test_samples_to_uint8_truncate_like_dpdm():
    x = np.array([-1.0, -0.999, 0.0, 0.999, 1.0, 2.0], np.float32)
    np.testing.assert_array_equal(fid.samples_to_uint8(x, truncate=True), [0, 0, 127, 254, 255, 255])


def test_reference_statistics_of_a_subset_have_their_own_cache(tmp_path):
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    ext = _FakeExtractor()
    full = fid.reference_statistics("toy", "test", images=images, extractor=ext,
                                    cache_dir=str(tmp_path))
    sub = fid.reference_statistics("toy", "test", images=images, extractor=ext,
                                   cache_dir=str(tmp_path), num_images=25)
    assert os.path.exists(fid.stats_path("toy", "test", str(tmp_path), 40, fid.images_digest(images)))
    assert os.path.exists(fid.stats_path("toy", "test", str(tmp_path), 25, fid.images_digest(images[:25])))
    np.testing.assert_allclose(sub[0], fid.feature_statistics(ext(images[:25]))[0])
    assert not np.allclose(full[0], sub[0])


def test_reference_cache_is_keyed_by_exactly_the_images(tmp_path):
    """A smoke run's subset (data.max_examples) must not be served as the full set's statistics."""
    rng = np.random.default_rng(8)
    full = rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    ext = _FakeExtractor()
    small = fid.reference_statistics("toy", "train", images=full[:20], extractor=ext, cache_dir=str(tmp_path))
    big = fid.reference_statistics("toy", "train", images=full, extractor=ext, cache_dir=str(tmp_path))
    np.testing.assert_allclose(big[0], fid.feature_statistics(ext(full))[0])
    assert not np.allclose(small[0], big[0])
    other = full.copy()
    other[0] ^= 1  # same count, other pixels: another entry
    changed = fid.reference_statistics("toy", "train", images=other, extractor=ext, cache_dir=str(tmp_path))
    assert not np.allclose(changed[0], big[0])
