"""Argument validators. Each raises TypeError / ValueError naming the argument."""
from __future__ import annotations

import math
from typing import Sequence, Tuple


def check_float(value, name: str, *, low=None, high=None, low_open=False) -> float:
    """A finite real number (not a bool) within [low, high] ((low, high] with low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_choice(value, name: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def check_percentile(percentile, name: str = "percentile") -> float:
    """The dynamic-thresholding ops' percentile: a fraction in [0, 1]."""
    p = check_float(percentile, name)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1] (0.995 is the paper's "
                         f"99.5th percentile), got {p}")
    return p


def check_attention_shapes(q_shape, k_shape, v_shape) -> Tuple[int, int, int, int]:
    """(B, H, Lq, D) of q after checking that k and v (B, H, Lk, D) fit it."""
    q_shape, k_shape, v_shape = tuple(q_shape), tuple(k_shape), tuple(v_shape)
    b, h, lq, d = q_shape
    if k_shape[:2] != (b, h) or k_shape[3] != d:
        raise ValueError(f"k must have shape (B, H, Lk, D) = ({b}, {h}, Lk, {d}), got {k_shape}")
    if v_shape != k_shape:
        raise ValueError(f"v must have k's shape {k_shape}, got {v_shape}")
    if min(q_shape) == 0 or k_shape[2] == 0:
        raise ValueError(f"q and k must not be empty, got {q_shape} and {k_shape}")
    return b, h, lq, d
