"""Checks of DP parameters that run before any compute, with messages a user can act on."""
from __future__ import annotations

import math

from dpdm_jax.validation import require_int as _require_int
from dpdm_jax.validation import require_number as _require_number


def validate_accounting_params(
    *,
    target_epsilon=None,
    sampling_rate=None,
    delta=None,
    steps=None,
    allow_zero_steps: bool = False,
) -> None:
    """Validate the parameters the accountant sees (only those given)."""
    if target_epsilon is not None:
        eps = _require_number("epsilon", target_epsilon)
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"epsilon must be finite and > 0, got {target_epsilon}")
    if sampling_rate is not None:
        q = _require_number("sampling_rate (q)", sampling_rate)
        if not 0 < q <= 1:
            raise ValueError(f"sampling_rate q must be in (0, 1], got {sampling_rate}")
    if delta is not None:
        d = _require_number("delta", delta)
        if not 0 < d < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
    if steps is not None:
        t = _require_int("steps (T)", steps)
        if t < (0 if allow_zero_steps else 1):
            raise ValueError(f"steps T must be >= {0 if allow_zero_steps else 1}, got {steps}")


def validate_dp_params(
    *,
    target_epsilon: float,
    delta: float,
    dataset_size: int,
    expected_batch_size: float,
    steps: int,
    clip_norm: float,
    noise_multiplicity: int,
    allow_delta_above_1_over_n: bool = False,
) -> None:
    """Validate a DP training configuration before any compute.

    Raises:
      TypeError / ValueError with a message naming the parameter and the allowed range.
    """
    n = _require_int("dataset_size (N)", dataset_size)
    if n < 1:
        raise ValueError(f"dataset_size N must be >= 1 (the dataset is empty), got {dataset_size}")
    b = _require_number("expected_batch_size", expected_batch_size)
    if not 0 < b <= n:
        raise ValueError(f"expected_batch_size must be in (0, N={n}], got {expected_batch_size}")
    validate_accounting_params(target_epsilon=target_epsilon, sampling_rate=b / n, delta=delta, steps=steps)
    c = _require_number("clip_norm (C)", clip_norm)
    if not (c > 0 and math.isfinite(c)):
        raise ValueError(f"clip_norm C must be finite and > 0, got {clip_norm}")
    k = _require_int("noise_multiplicity (K)", noise_multiplicity)
    if k < 1:
        raise ValueError(f"noise_multiplicity K must be >= 1, got {noise_multiplicity}")
    if delta >= 1.0 / n and not allow_delta_above_1_over_n:
        raise ValueError(
            f"delta={delta} >= 1/N={1.0 / n:.3g}: such a delta permits releasing an example outright. "
            "Use delta < 1/N (the paper uses 1e-5 for N=60000), or set allow_delta_above_1_over_n "
            "if you really mean it."
        )


def check_params_only(variables) -> None:
    """Refuse models with state other than parameters (e.g. BatchNorm's batch statistics).

    Batch statistics mix examples before clipping, so a per-example sensitivity of C would
    no longer hold.
    """
    extra = sorted(k for k in variables.keys() if k != "params")
    if extra:
        raise ValueError(
            f"The model has variable collections {extra} besides 'params'. DP-SGD needs every "
            "example's gradient to depend on that example only: use GroupNorm/LayerNorm, not "
            "BatchNorm or any other batch statistics."
        )
