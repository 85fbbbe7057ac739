"""Plain jnp definitions of the ops, channels-last: the JAX path's ground truth.

They are the definitions of ``imagen_fast.ops.reference`` (the torch ground truth)
written for (N, *spatial, C) images, and serve as the implementation wherever no
Pallas kernel runs (CPU, GPU). Statistics are kept in float32 (float64 for float64
inputs, under ``jax_enable_x64``); outputs have the input's dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp


def stats_dtype(dtype) -> jnp.dtype:
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def activate(y, activation: str):
    if activation == "silu":
        return jax.nn.silu(y)
    if activation == "gelu":
        return jax.nn.gelu(y, approximate=False)
    return y


def group_norm_silu(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5,
                    scale=None, shift=None, activation: Optional[str] = "silu"):
    """y = act(((x - mean_g) * rstd_g * weight + bias) * (1 + scale) + shift).

    x is (N, *spatial, C); groups are C // num_groups consecutive channels; mean and
    biased variance per (sample, group) over the group's channels and all positions.
    weight, bias: (C,); scale, shift: (N, C).
    """
    n, c = x.shape[0], x.shape[-1]
    dt = stats_dtype(x.dtype)
    xg = x.astype(dt).reshape(n, -1, num_groups, c // num_groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    per_sample = (n,) + (1,) * (x.ndim - 2) + (c,)
    if weight is not None:
        y = y * weight.astype(dt)
    if bias is not None:
        y = y + bias.astype(dt)
    if scale is not None:
        y = y * (1 + scale.astype(dt).reshape(per_sample))
    if shift is not None:
        y = y + shift.astype(dt).reshape(per_sample)
    return activate(y, activation or "none").astype(x.dtype)


def attention(q, k, v, key_padding_mask=None, scale: Optional[float] = None):
    """softmax(q k^T * scale, masked) v over (B, H, L, D); key_padding_mask (B, Lk)
    bool, True = attend. A query with every key masked outputs zeros (no NaN, zero
    gradients)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    dt = stats_dtype(q.dtype)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=dt) * scale
    if key_padding_mask is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:
        keep = key_padding_mask[:, None, None, :]
        any_key = keep.any(axis=-1, keepdims=True)
        # finite scores on rows with no key, then zeroed: neither NaN nor NaN gradients
        scores = jnp.where(keep, scores, -jnp.inf)
        scores = jnp.where(any_key, scores, 0.0)
        probs = jax.nn.softmax(scores, axis=-1) * any_key
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v, preferred_element_type=dt)
    return out.astype(q.dtype)


def quantile_ranks(n: int, q: float):
    """(lo, hi, frac): torch.quantile's linear interpolation between the order
    statistics lo and hi (0-based) of n values, the rank q * (n - 1) in float64."""
    rank = q * (n - 1)
    lo = math.floor(rank)
    return lo, min(lo + 1, n - 1), rank - lo


def quantile_linear(values, q: float):
    """torch.quantile(values, q, dim=-1), linear interpolation, by sorting."""
    lo, hi, frac = quantile_ranks(values.shape[-1], q)
    s = jnp.sort(values, axis=-1)
    below, above = s[..., lo], s[..., hi]
    return below + (above - below) * frac


def dynamic_threshold(x0, percentile: float = 0.995, min_value: float = 1.0):
    """Imagen's dynamic thresholding per sample: s = quantile(|x0|, percentile) over
    all non-batch axes (torch.quantile's definition), s = max(s, min_value),
    clip(x0, -s, s) / s."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(quantile_linear(flat, percentile), min_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s
