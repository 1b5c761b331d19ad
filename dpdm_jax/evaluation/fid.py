"""FID: Inception pool3 feature statistics and the Frechet distance between two Gaussians.

    FID = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})

Statistics are float64 (mean, covariance with ddof=1 as ``np.cov`` in the DPDM reference code),
accumulated in streaming form so 60k x 2048 features need not be held at once. The reference
statistics of a dataset split (method.md section 5: the real TRAIN set) are computed once and
cached as ``<cache_dir>/<dataset>_<split>[_n<N>]_<sha256 of the images, 16 hex>.npz``, keyed by
exactly the images they summarise (a smoke run's subset cannot poison the full set's entry).
Default cache dir: ~/.cache/dpdm_jax/fid_stats, or $DPDM_FID_STATS_DIR; runs on synthetic data
cache inside their workdir. The statistics of the TRAIN split are a statistic of PRIVATE data,
not privatised: keep the cache as private as the training set (docs/privacy.md).

Images are uint8 (N, H, W, C). Samples in the model range [-1, 1] are converted with
``dpdm_jax.data.from_model_range`` (rounding); the DPDM reference code truncated instead
(``(x * 255).to(torch.uint8)``), which shifts pixels by half a level on average -- pass
``truncate=True`` to ``samples_to_uint8`` here to reproduce that.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Tuple

import numpy as np
import scipy.linalg

from dpdm_jax.evaluation import inception

log = logging.getLogger(__name__)

ENV_STATS_DIR = "DPDM_FID_STATS_DIR"  # read by main.py only, into eval.fid_stats_dir
DEFAULT_STATS_DIR = os.path.join("~", ".cache", "dpdm_jax", "fid_stats")
STATS_FORMAT = "dpdm_jax-fid-stats-v1"

Stats = Tuple[np.ndarray, np.ndarray]


class FeatureStats:
    """Streaming mean / covariance in float64 (shifted sums for numerical care)."""

    def __init__(self, dim: Optional[int] = None):
        self.dim, self.n = dim, 0  # dim None: taken from the first update
        self._shift: Optional[np.ndarray] = None
        self._sum = self._outer = None

    def update(self, features) -> None:
        f = np.asarray(features, np.float64)
        f = f.reshape(-1, self.dim or f.shape[-1])
        if len(f) == 0:
            return
        if self._shift is None:  # centre on the first batch's mean: avoids cancellation
            self.dim = f.shape[1]
            self._shift = f.mean(0)
            self._sum = np.zeros(self.dim, np.float64)
            self._outer = np.zeros((self.dim, self.dim), np.float64)
        d = f - self._shift
        self._sum += d.sum(0)
        self._outer += d.T @ d
        self.n += len(f)

    def mean_cov(self, ddof: int = 1) -> Stats:
        if self.n <= ddof:
            raise ValueError(f"need more than {ddof} feature vectors, got {self.n}")
        dm = self._sum / self.n
        cov = (self._outer - self.n * np.outer(dm, dm)) / (self.n - ddof)
        return self._shift + dm, (cov + cov.T) / 2


def feature_statistics(features, ddof: int = 1) -> Stats:
    """(N, D) features -> (mean (D,), covariance (D, D)), float64; ddof=1 equals np.cov."""
    s = FeatureStats()
    s.update(features)
    return s.mean_cov(ddof)


def _sqrt_trace_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^{1/2}) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))), all symmetric PSD."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def _sqrt_trace_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """scipy.linalg.sqrtm(S1 S2) with the pytorch-fid fixes (eps*I offset, drop tiny imag)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning("sqrtm(S1 S2) is singular; adding %g to the diagonals", eps)
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "eigh", eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    method='eigh' (default): the trace of the matrix square root from the eigenvalues of the
    symmetric PSD matrix sqrt(S1) S2 sqrt(S1) (same spectrum as S1 S2), with tiny negative
    eigenvalues from round-off clipped to 0 -- stable for near-singular covariances.
    method='sqrtm': scipy.linalg.sqrtm(S1 S2) as in pytorch-fid / the DPDM code.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: {mu1.shape} {s1.shape} vs {mu2.shape} {s2.shape}")
    if method == "eigh":
        tr_sqrt = _sqrt_trace_eigh(s1, s2)
    elif method == "sqrtm":
        tr_sqrt = _sqrt_trace_sqrtm(s1, s2, eps)
    else:
        raise ValueError(f"unknown method {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def fid_from_stats(stats1: Stats, stats2: Stats, method: str = "eigh") -> float:
    return frechet_distance(stats1[0], stats1[1], stats2[0], stats2[1], method=method)


# ----------------------------------------------------------------------------------------------
# Statistics of image sets


def samples_to_uint8(x, truncate: bool = False) -> np.ndarray:
    """Model-range samples in [-1, 1] -> uint8. Rounds; truncate=True mimics the DPDM code."""
    x = np.asarray(x, np.float32)
    if not truncate:
        from dpdm_jax.data import from_model_range  # noqa: PLC0415

        return from_model_range(x)
    return (np.clip(x / 2 + 0.5, 0, 1) * 255).astype(np.uint8)


def image_statistics(images, extractor: Optional[inception.InceptionFeatureExtractor] = None,
                     chunk: int = 5000, progress: Optional[Callable[[int, int], None]] = None,
                     ddof: int = 1) -> Stats:
    """uint8 images (array, or an iterable of uint8 batches) -> (mu, sigma) of their features."""
    extractor = extractor or inception.InceptionFeatureExtractor()
    stats = FeatureStats()
    if isinstance(images, np.ndarray):
        total = len(images)
        batches = (images[i:i + chunk] for i in range(0, total, chunk))
    else:
        total, batches = -1, iter(images)
    done = 0
    for batch in batches:
        base = done
        stats.update(extractor(np.asarray(batch),
                               progress=(lambda d, _t: progress(base + d, total)) if progress else None))
        done += len(batch)
    return stats.mean_cov(ddof)


def stats_dir(cache_dir: Optional[str] = None) -> str:
    """cache_dir, or ~/.cache/dpdm_jax/fid_stats (main.py maps $DPDM_FID_STATS_DIR to eval.fid_stats_dir)."""
    return os.path.expanduser(cache_dir or DEFAULT_STATS_DIR)


def images_digest(images: np.ndarray) -> str:
    """16 hex digits of SHA-256 over the images' dtype, shape and bytes: the cache key."""
    import hashlib  # noqa: PLC0415

    images = np.ascontiguousarray(images)
    h = hashlib.sha256(f"{images.dtype}|{images.shape}|".encode())
    h.update(images.tobytes())
    return h.hexdigest()[:16]


class MemoisedExtractor:
    """Wraps a feature extractor so that the same images (by `images_digest`) are run through it once.

    `--mode=eval` with FID and KID reads the samples twice, and the first N training images twice
    when fid_reference_images == kid_reference_images: this halves its Inception time.
    """

    def __init__(self, extractor: Callable):
        self.extractor = extractor
        self._features: dict[str, np.ndarray] = {}

    def __call__(self, images, progress: Optional[Callable[[int, int], None]] = None, **kw) -> np.ndarray:
        images = np.asarray(images)
        key = images_digest(images)
        if key not in self._features:
            self._features[key] = self.extractor(images, progress=progress, **kw)
        return self._features[key]


def stats_path(dataset: str, split: str, cache_dir: Optional[str] = None,
               num_images: Optional[int] = None, digest: Optional[str] = None) -> str:
    """The cache file of the statistics of `num_images` images whose `images_digest` is `digest`."""
    suffix = f"_n{num_images}" if num_images else ""
    suffix += f"_{digest}" if digest else ""
    return os.path.join(stats_dir(cache_dir), f"{dataset}_{split}{suffix}.npz")


def save_stats(path: str, mu, sigma, **meta) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, __format__=np.array(STATS_FORMAT),
             **{k: np.array(v) for k, v in meta.items()})
    os.replace(tmp, path)


def load_stats(path: str) -> Stats:
    with np.load(path, allow_pickle=False) as z:
        return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)


def reference_statistics(dataset: str, split: str = "train", images=None,
                         extractor: Optional[inception.InceptionFeatureExtractor] = None,
                         cache_dir: Optional[str] = None, recompute: bool = False,
                         progress: Optional[Callable[[int, int], None]] = None,
                         num_images: Optional[int] = None) -> Stats:
    """Cached (mu, sigma) of a real dataset split.

    The images (uint8 array, or a zero-argument callable returning one; default
    ``dpdm_jax.data.load_dataset(dataset, split).images``), cut to their first ``num_images``,
    are hashed, and the cache file is keyed by that digest (``stats_path``): another subset,
    another file. Statistics of the train split are statistics of PRIVATE data.
    """
    if images is None:
        from dpdm_jax.data import load_dataset  # noqa: PLC0415

        images = load_dataset(dataset, split).images
    elif callable(images):
        images = images()
    images = np.asarray(images)[:num_images]
    path = stats_path(dataset, split, cache_dir, len(images), images_digest(images))
    if os.path.exists(path) and not recompute:
        with np.load(path, allow_pickle=False) as z:
            fmt = str(z["__format__"]) if "__format__" in z.files else ""
            net = str(z["network_sha256"]) if "network_sha256" in z.files else ""
        if fmt == STATS_FORMAT and net == inception.SOURCE_SHA256:
            log.info("FID reference stats from %s", path)
            return load_stats(path)
        log.warning("ignoring stale FID stats %s (format %r, network %r)", path, fmt, net[:12])
    log.info("computing FID reference stats of %s/%s (%d images) into %s", dataset, split, len(images), path)
    mu, sigma = image_statistics(images, extractor, progress=progress)
    save_stats(path, mu, sigma, dataset=dataset, split=split, num_images=len(images),
               network_sha256=inception.SOURCE_SHA256, ddof=1)
    return mu, sigma


def fid_of_samples(images, dataset: str, split: str = "train",
                   extractor: Optional[inception.InceptionFeatureExtractor] = None,
                   cache_dir: Optional[str] = None,
                   progress: Optional[Callable[[int, int], None]] = None) -> float:
    """FID of generated uint8 images against the cached reference stats of dataset/split."""
    extractor = extractor or inception.InceptionFeatureExtractor()
    ref = reference_statistics(dataset, split, extractor=extractor, cache_dir=cache_dir)
    return fid_from_stats(image_statistics(images, extractor, progress=progress), ref)


def main(argv=None) -> None:
    """python -m dpdm_jax.evaluation.fid --dataset mnist [--split train] [--num-images N]"""
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(description="Compute and cache FID reference statistics.")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--num-images", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--weights", default=None, help="converted Inception .npz")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--recompute", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ext = inception.InceptionFeatureExtractor(path=args.weights, batch_size=args.batch_size)
    mu, sigma = reference_statistics(args.dataset, args.split, extractor=ext,
                                     cache_dir=args.cache_dir, recompute=args.recompute,
                                     num_images=args.num_images)
    print(f"{args.dataset}/{args.split} statistics cached in {stats_dir(args.cache_dir)}: "
          f"mu {mu.shape}, tr(sigma) {np.trace(sigma):.4f}")


if __name__ == "__main__":
    main()
