"""KID (Binkowski et al. 2018): unbiased squared MMD between Inception features, polynomial kernel.

    k(x, y) = (x.y / d + 1)^3                        (d = feature dimension, 2048 for pool3)
    MMD^2_u = sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1))
              - 2 sum_{i,j} k(x_i, y_j) / (m n)

MMD^2_u is an unbiased estimator of the population MMD^2 (which is 0 iff the feature
distributions agree on their first three moments, for this kernel), so unlike FID it has no
sample-size bias and KIDs at different sample counts are comparable in expectation. As in the
reference implementations (Binkowski's code, StyleGAN2-ADA's metrics, torch-fidelity) it is
averaged over ``num_subsets`` = 100 random subsets of ``subset_size`` = min(1000, m, n) rows of
each set (each subset drawn without replacement, subsets independently).

Reported (``kid``): ``mean`` (the average over subsets: the KID), ``subset_std`` (std, ddof=1, of
the per-subset estimates: the spread of a KID computed from ``subset_size`` samples -- what
torch-fidelity calls ``kernel_inception_distance_std``) and ``se`` = subset_std / sqrt(num_subsets)
(the standard error of the subset average). ``se`` measures the subsampling error only when the
pools are much larger than ``subset_size``; when a pool IS the subset (m or n <= 1000), every
subset reuses it and neither number includes that pool's own sampling error.

Reference features: the Inception features of the first N images of a real split, cached as
``<cache_dir>/kid_features_<dataset>_<split>_n<N>.npz`` (default cache dir
~/.cache/dpdm_jax/fid_stats, next to the FID statistics). They are a statistic of the PRIVATE
training set, not privatised: a KID against them is outside the (epsilon, delta) guarantee.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "dpdm_jax", "fid_stats")
FEATURES_FORMAT = "dpdm_jax-kid-features-v1"
DEFAULT_REFERENCE_IMAGES = 2000
OUTSIDE_DP = ("KID compares with Inception features of (a subset of) the PRIVATE training set, not "
              "privatised: the KID value is outside the (epsilon, delta) guarantee.")
_PRECOMPUTE_MAX_ENTRIES = 10**7  # a whole kernel matrix up to 80 MB (float64), else per subset


def polynomial_kernel(x, y, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """(x y^T / d + coef0)^degree in float64; x (m, d), y (n, d)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """The unbiased MMD^2 from kernel matrices K(X,X) (m,m), K(Y,Y) (n,n), K(X,Y) (m,n)."""
    m, n = kxy.shape
    if kxx.shape != (m, m) or kyy.shape != (n, n) or min(m, n) < 2:
        raise ValueError(f"kernel shapes {kxx.shape} {kyy.shape} {kxy.shape} (need m, n >= 2)")
    sxx = kxx.sum() - np.trace(kxx)
    syy = kyy.sum() - np.trace(kyy)
    return float(sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2.0 * kxy.sum() / (m * n))


def kid(features1, features2, num_subsets: int = 100, max_subset_size: int = 1000,
        seed: int = 0) -> dict:
    """KID between feature sets (m, d) and (n, d), e.g. generated vs reference.

    Returns dict(mean, se, subset_std, subset_size, num_subsets, num_samples (m),
    num_reference (n)); see the module docstring for what ``se`` and ``subset_std`` measure.
    """
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected (m, d) and (n, d) features, got {x.shape} and {y.shape}")
    m, n = len(x), len(y)
    s = min(max_subset_size, m, n)
    if s < 2 or num_subsets < 1:
        raise ValueError(f"need >= 2 feature vectors per set and >= 1 subset (m={m}, n={n})")
    rng = np.random.default_rng(seed)
    # A kernel matrix small enough is computed once and indexed per subset, else per subset
    # (e.g. 60k samples vs 2k references: K(Y,Y) once, K(X,X) and K(X,Y) per subset).
    pre = {key: polynomial_kernel(a, b) for key, a, b in (("xx", x, x), ("yy", y, y), ("xy", x, y))
           if len(a) * len(b) <= _PRECOMPUTE_MAX_ENTRIES}

    def block(key, a, b, i, j):
        return pre[key][np.ix_(i, j)] if key in pre else polynomial_kernel(a[i], b[j])

    values = np.empty(num_subsets)
    for t in range(num_subsets):
        i, j = rng.choice(m, s, replace=False), rng.choice(n, s, replace=False)
        values[t] = mmd2_unbiased(block("xx", x, x, i, i), block("yy", y, y, j, j),
                                  block("xy", x, y, i, j))
    std = float(values.std(ddof=1)) if num_subsets > 1 else float("nan")
    return dict(mean=float(values.mean()), se=std / np.sqrt(num_subsets), subset_std=std,
                subset_size=int(s), num_subsets=int(num_subsets), num_samples=int(m),
                num_reference=int(n))


# ----------------------------------------------------------------------------------------------
# Reference features of a real split (cached) and the KID of uint8 images


def features_path(dataset: str, split: str, num_images: int, cache_dir: Optional[str] = None) -> str:
    return os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR),
                        f"kid_features_{dataset}_{split}_n{int(num_images)}.npz")


def reference_features(dataset: str, split: str = "train",
                       num_images: int = DEFAULT_REFERENCE_IMAGES, images=None,
                       extractor: Optional[Callable] = None, cache_dir: Optional[str] = None,
                       recompute: bool = False, network_id: Optional[str] = None) -> np.ndarray:
    """Cached float32 (N, d) features of the first ``num_images`` images of dataset/split.

    ``images``: uint8 array or zero-argument callable returning one (default
    ``load_dataset(dataset, split)``); ``extractor``: uint8 images -> features (default the FID
    Inception network); ``network_id`` identifies the extractor in the cache (default the FID
    network's SHA-256). The cache key is (dataset, split, the exact image count, network).
    A PRIVATE training-set statistic: see the module docstring.
    """
    if extractor is None or network_id is None:
        from dpdm_jax.evaluation import inception  # noqa: PLC0415

        extractor = extractor or inception.InceptionFeatureExtractor()
        network_id = network_id or inception.SOURCE_SHA256
    path = features_path(dataset, split, num_images, cache_dir)
    if os.path.exists(path) and not recompute:
        with np.load(path, allow_pickle=False) as z:
            ok = (str(z["__format__"]) == FEATURES_FORMAT and str(z["network"]) == network_id
                  and len(z["features"]) == num_images)
            if ok:
                log.info("KID reference features from %s", path)
                return z["features"]
        log.warning("ignoring stale KID reference features %s", path)
    if images is None:
        from dpdm_jax.data import load_dataset  # noqa: PLC0415

        images = load_dataset(dataset, split).images
    elif callable(images):
        images = images()
    images = np.asarray(images)
    if len(images) < num_images:
        raise ValueError(f"{dataset}/{split} has {len(images)} images, fewer than the {num_images} "
                         "asked for as the KID reference")
    log.info("computing KID reference features of %s/%s (%d images)", dataset, split, num_images)
    feats = np.asarray(extractor(images[:num_images]), np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, features=feats, __format__=np.array(FEATURES_FORMAT), network=np.array(network_id),
             dataset=np.array(dataset), split=np.array(split), num_images=np.array(num_images))
    os.replace(tmp, path)
    return feats


def kid_of_images(images, reference: np.ndarray, extractor: Callable, seed: int = 0, **kw) -> dict:
    """KID of uint8 images (their features by ``extractor``) against reference features."""
    return kid(extractor(np.asarray(images)), reference, seed=seed, **kw)
