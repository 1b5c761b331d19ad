"""The value checks every layer shares: one definition each, so the config check and the libraries agree.

Each helper returns the value converted (int / float / str / bool) or raises TypeError (wrong type)
or ValueError (out of range), with a message that starts with the name it was given, e.g. the
config field `dp.clip_norm` or a library argument `clip_norm (C)`. `experiment.validate_config`
uses them for every field; library constructors (dp.validation, dp.DPPlan) use them for their
arguments. Choice lists are passed in from the registries that define them
(diffusion.SAMPLERS, diffusion.PARAMETERISATIONS, dp.ACCOUNTANTS, models.CONV_IMPLS, data.DATASETS).
"""
from __future__ import annotations

import math
import numbers

import numpy as np


def require_int(name: str, value, minimum: int | None = None) -> int:
    """An integer (not a bool), >= minimum if given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def require_number(name: str, value) -> float:
    """A real number (not a bool), not NaN; +-inf allowed."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def require_real(name: str, value, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
                 hi_open: bool = False) -> float:
    """A finite real number in the interval [lo, hi] (an end is excluded if *_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)):
        interval = f"{'(' if lo_open or lo == -math.inf else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return v


def require_choice(name: str, value, choices) -> str:
    """One of `choices` (read them from the registry that defines them)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def require_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def require_str(name: str, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
    return value
