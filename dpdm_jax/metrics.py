"""What a user sees: progress lines, metrics as JSONL and TensorBoard, sample grids as PNG."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
from absl import logging
from PIL import Image


def image_grid(images: np.ndarray, num_cols: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) into one uint8 (rows*(H+p)+p, cols*(W+p)+p, C) grid."""
    n, h, w, c = images.shape
    cols = num_cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        grid[y : y + h, x : x + w] = img
    return grid


def save_image_grid(images: np.ndarray, path: str, num_cols: int | None = None) -> None:
    grid = image_grid(images, num_cols)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


class MetricsWriter:
    """Appends metrics to `workdir/metrics.jsonl` and TensorBoard events (on process 0 only)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard is optional; JSONL is always written
                logging.warning("tensorboardX not installed: no TensorBoard events.")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    if isinstance(v, (np.generic, np.ndarray)):
        return v.item() if np.ndim(v) == 0 else np.asarray(v).tolist()
    return v


class Progress:
    """Steps/s and ETA; renders a one-line bar when stderr is a terminal."""

    def __init__(self, total_steps: int, start_step: int):
        self.total = total_steps
        self.start_step = start_step
        self.start_time = time.time()
        self.interactive = sys.stderr.isatty()

    def rates(self, step: int) -> tuple[float, float]:
        """(steps per second since start, ETA in seconds)."""
        elapsed = max(time.time() - self.start_time, 1e-9)
        rate = (step - self.start_step) / elapsed
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        return rate, eta

    def render(self, step: int, text: str) -> None:
        if not self.interactive:
            return
        frac = step / max(self.total, 1)
        bar = "#" * int(30 * frac)
        sys.stderr.write(f"\r[{bar:<30}] {step}/{self.total} {text}")
        sys.stderr.flush()
        if step >= self.total:
            sys.stderr.write("\n")


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
