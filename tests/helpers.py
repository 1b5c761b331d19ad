"""Fixture writers shared by the tests: tiny configs, IDX files, runs of `main`, final states, tree checks.

One definition each, so two tests cannot drift apart in how they build a config or write a file.
"""
from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys

import chex
import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def override(config, **overrides):
    """Set dotted fields in place ('training.max_steps'=3) and return the config."""
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return config


def tiny_config(**overrides):
    """configs/test_tiny with no sample grids, plus `overrides` (dotted field names)."""
    from configs import test_tiny

    config = test_tiny.get_config()
    config.training.sample_every = -1
    return override(config, **overrides)


def idx_bytes(arr: np.ndarray) -> bytes:
    """An array as IDX (MNIST's format): magic 0 0 8 ndim, big-endian uint32 dims, uint8 data."""
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path, arr, gz: bool = False) -> None:
    """Write `arr` as an IDX file at `path` (str or Path), gzip-compressed if gz."""
    raw = idx_bytes(arr)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)


def main_env(**extra) -> dict:
    """The environment of a `python -m dpdm_jax.main` child: one CPU device, the shared XLA cache."""
    return {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir, **extra}


def main_command(*args, config: str = "configs/test_tiny.py") -> list[str]:
    return [sys.executable, "-m", "dpdm_jax.main", f"--config={config}", *args]


def run_main(*args, config: str = "configs/test_tiny.py", env: dict | None = None, timeout: float = 900):
    """Run main to completion; returns the CompletedProcess (stdout, stderr as text)."""
    return subprocess.run(main_command(*args, config=config), cwd=REPO, env=env or main_env(),
                          capture_output=True, text=True, timeout=timeout)


def restore_final_state(workdir: str, config=None):
    """The TrainState of the latest checkpoint in `workdir/checkpoints` (config: default tiny_config())."""
    from dpdm_jax import experiment, train
    from dpdm_jax.checkpoint import Checkpointer

    config = config or tiny_config()
    template = train.state_template(config, experiment.build_model(config))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.restore_latest(template)[0]
    finally:
        ckpt.close()


def assert_trees_equal(a, b) -> None:
    """Bit-identical trees, structure included (chex)."""
    chex.assert_trees_all_equal(jax.device_get(a), jax.device_get(b))


def assert_trees_close(a, b, **tolerances) -> None:
    chex.assert_trees_all_close(jax.device_get(a), jax.device_get(b), **tolerances)
