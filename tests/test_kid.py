"""KID: a hand-computed case, the closed-form MMD^2 of Gaussians under the cubic kernel, zero for
identical distributions (unbiased: the average over seeds is 0 within its standard error), the
subset protocol, and the cached reference features."""
import itertools
import math

import numpy as np
import pytest

from dpdm_jax.evaluation import kid


def test_hand_computed_one_dimensional_case():
    # d = 1: k(x, y) = (xy + 1)^3. X = {1, 2}, Y = {0, 1}:
    # K_XX off-diagonal k(1,2) = 27; K_YY off-diagonal k(0,1) = 1;
    # K_XY: k(1,0)=1, k(1,1)=8, k(2,0)=1, k(2,1)=27 -> mean 37/4.  MMD^2 = 27 + 1 - 2*37/4 = 9.5
    x, y = np.array([[1.0], [2.0]]), np.array([[0.0], [1.0]])
    k = kid.polynomial_kernel
    assert kid.mmd2_unbiased(k(x, x), k(y, y), k(x, y)) == pytest.approx(9.5)
    r = kid.kid(x, y, num_subsets=5)  # subset = the whole sets: every subset gives 9.5
    assert r["mean"] == pytest.approx(9.5) and r["subset_std"] == pytest.approx(0.0, abs=1e-12)
    assert (r["subset_size"], r["num_samples"], r["num_reference"]) == (2, 2, 2)


def test_kernel_divides_by_the_feature_dimension():
    x = np.array([[1.0, 2.0, 3.0]])
    y = np.array([[1.0, 0.0, -1.0], [2.0, 2.0, 2.0]])
    np.testing.assert_allclose(kid.polynomial_kernel(x, y), [[((1 - 3) / 3 + 1) ** 3, (12 / 3 + 1) ** 3]])


def _moments(mu, cov):
    """First three raw moment tensors of N(mu, cov)."""
    m2 = cov + np.outer(mu, mu)
    m3 = (np.einsum("a,b,c->abc", mu, mu, mu) + np.einsum("a,bc->abc", mu, cov)
          + np.einsum("b,ac->abc", mu, cov) + np.einsum("c,ab->abc", mu, cov))
    return mu, m2, m3


def gaussian_mmd2(mu1, cov1, mu2, cov2):
    """Population MMD^2 under (x.y/d + 1)^3 = sum_j C(3,j) (x.y)^j / d^j: as E(X.Y)^j is the inner
    product of the j-th moment tensors, MMD^2 = sum_{j=1..3} C(3,j) ||M_j(P) - M_j(Q)||^2 / d^j."""
    d = len(mu1)
    return sum(math.comb(3, j) * np.sum((a - b) ** 2) / d ** j
               for j, a, b in zip((1, 2, 3), _moments(mu1, cov1), _moments(mu2, cov2)))


def test_closed_form_moment_formula_matches_a_direct_expectation():
    """The moment-tensor formula against E k by exact enumeration on a tiny discrete case."""
    pts_p, pts_q = np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[1.0, 1.0], [-1.0, 0.5], [0.0, 0.0]])

    def ek(a, b):
        return np.mean([(u @ v / 2 + 1) ** 3 for u, v in itertools.product(a, b)])

    direct = ek(pts_p, pts_p) + ek(pts_q, pts_q) - 2 * ek(pts_p, pts_q)

    def moments(p):
        return (p.mean(0), np.einsum("na,nb->ab", p, p) / len(p),
                np.einsum("na,nb,nc->abc", p, p, p) / len(p))

    formula = sum(math.comb(3, j) * np.sum((a - b) ** 2) / 2 ** j
                  for j, a, b in zip((1, 2, 3), moments(pts_p), moments(pts_q)))
    assert formula == pytest.approx(direct, rel=1e-12)


def test_shifted_gaussian_kid_is_unbiased_for_the_closed_form():
    d, n = 4, 200
    mu2, cov2 = np.full(d, 0.5), np.diag([1.0, 1.5, 0.5, 1.0])
    exact = gaussian_mmd2(np.zeros(d), np.eye(d), mu2, cov2)
    root = np.linalg.cholesky(cov2)
    means = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n, d))
        y = mu2 + rng.normal(size=(n, d)) @ root.T
        means.append(kid.kid(x, y, num_subsets=1, max_subset_size=n, seed=seed)["mean"])
    se = np.std(means, ddof=1) / np.sqrt(len(means))
    print(f"closed form {exact:.4f}, estimate {np.mean(means):.4f} +- {se:.4f}")
    assert abs(np.mean(means) - exact) < 4 * se
    assert se < 0.2 * exact  # the check has power: the closed form is far from 0


def test_identical_distributions_give_zero_in_expectation():
    d, n = 8, 100
    means, ses = [], []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        r = kid.kid(rng.normal(size=(n, d)) + 1.0, rng.normal(size=(n, d)) + 1.0, num_subsets=10,
                    max_subset_size=50, seed=seed)
        means.append(r["mean"])
        ses.append(r["se"])
    se_over_seeds = np.std(means, ddof=1) / np.sqrt(len(means))
    assert abs(np.mean(means)) < 4 * se_over_seeds
    assert min(means) < 0 < max(means)  # unbiased: it must go negative (a biased MMD would not)
    assert all(s > 0 for s in ses)


def test_subset_protocol_and_errors():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 3)), rng.normal(size=(50, 3)) + 0.3
    r = kid.kid(x, y, num_subsets=20, max_subset_size=1000, seed=1)
    assert r["subset_size"] == 30 and r["num_subsets"] == 20
    assert r["se"] == pytest.approx(r["subset_std"] / np.sqrt(20))
    assert kid.kid(x, y, num_subsets=20, seed=1) == r  # deterministic in the seed
    assert kid.kid(x, y, num_subsets=20, seed=2)["mean"] != r["mean"]
    # Per-subset kernels (large sets), or only K(X,X) precomputed, equal precomputed kernels.
    small = kid.kid(x, y, num_subsets=7, max_subset_size=10, seed=3)
    limit = kid._PRECOMPUTE_MAX_ENTRIES
    try:
        for kid._PRECOMPUTE_MAX_ENTRIES in (0, 30 * 30):
            assert kid.kid(x, y, num_subsets=7, max_subset_size=10, seed=3) == pytest.approx(small)
    finally:
        kid._PRECOMPUTE_MAX_ENTRIES = limit
    for bad in ((x[:1], y), (x, y[:, :2]), (x[0], y)):
        with pytest.raises(ValueError):
            kid.kid(*bad)


def test_reference_features_are_cached_by_count(tmp_path):
    calls = []

    def extractor(images):
        calls.append(len(images))
        return images.reshape(len(images), -1).astype(np.float32)

    images = np.random.default_rng(0).integers(0, 255, (40, 4, 4, 1)).astype(np.uint8)
    kw = dict(images=images, extractor=extractor, cache_dir=str(tmp_path), network_id="flat")
    f = kid.reference_features("toy", "train", 30, **kw)
    assert f.shape == (30, 16) and calls == [30]
    np.testing.assert_array_equal(kid.reference_features("toy", "train", 30, **kw), f)
    assert calls == [30]  # from the cache
    kid.reference_features("toy", "train", 20, **kw)
    assert calls == [30, 20]  # another count, another file
    kid.reference_features("toy", "train", 30, **(kw | dict(network_id="other")))
    assert calls == [30, 20, 30]  # another network: recomputed
    with pytest.raises(ValueError):
        kid.reference_features("toy", "train", 41, **kw)
    r = kid.kid_of_images(images[30:], f, extractor, num_subsets=3)
    assert r["num_samples"] == 10 and r["num_reference"] == 30


def test_eval_report_kid_and_label_accuracy_on_the_tiny_config(tmp_path, monkeypatch):
    """report.compute_kid / compute_label_accuracy wiring (flat pixels stand in for Inception)."""
    from configs import test_tiny
    from dpdm_jax import experiment
    from dpdm_jax import evaluate as report
    from dpdm_jax.evaluation import inception

    class Flat:
        def __init__(self, **_):
            pass

        calls = []

        def __call__(self, u8, progress=None):
            Flat.calls.append(len(u8))
            return np.asarray(u8).reshape(len(u8), -1).astype(np.float32)

    monkeypatch.setattr(inception, "InceptionFeatureExtractor", Flat)
    config = test_tiny.get_config()
    config.eval.label_classifier_epochs = 1
    config.eval.kid_num_subsets = 5
    train = experiment.load_training_data(config)
    config.eval.fid_reference_images = config.eval.kid_reference_images = len(train.images)
    extractor = report.feature_extractor(config)
    r = report.compute_kid(config, train.images[:20], str(tmp_path), extractor)
    assert (r["num_samples"], r["num_reference"], r["num_subsets"]) == (20, len(train.images), 5)
    assert list((tmp_path / "fid_stats").glob("kid_features_synthetic_train_n*.npz"))
    # FID after KID on the same samples and the same reference images: no image is featurised twice.
    assert np.isfinite(report.compute_fid(config, train.images[:20], str(tmp_path), extractor))
    assert sorted(Flat.calls) == sorted([20, len(train.images)])
    # The label classifier: trained on the run's (synthetic) train set, cached inside the run.
    from dpdm_jax.evaluation import label_accuracy

    asked = {}

    class Constant:
        num_classes, test_accuracy = 3, 0.9

        def predict(self, images):
            return np.zeros(len(images), np.int32)

    def fake_get(dataset, **kw):
        asked.update(kw, dataset=dataset)
        return Constant()

    monkeypatch.setattr(label_accuracy, "get_label_classifier", fake_get)
    la = report.compute_label_accuracy(config, train.images, train.labels, str(tmp_path))
    assert asked["dataset"] == "synthetic" and asked["epochs"] == 1
    assert len(asked["train"].images) == len(train.images) and asked["test"] is not None
    assert asked["cache_dir"] == str(tmp_path / "label_classifier")
    assert la["overall"] == pytest.approx(np.mean(train.labels == 0))
    assert la["classifier_test_accuracy"] == 0.9 and "PRIVATE" in la["outside_dp_guarantee"]
