"""Dynamic thresholding's exact percentile without a sort (Mosaic has none).

For non-negative floats the int32 bit pattern orders like the value, so the k-th
smallest |x| is found bit by bit: starting from 0, bit b (high to low) is kept when
fewer than k + 1 elements lie below the candidate prefix with that bit set. One
count pass per bit: 31 for float32, fewer for bfloat16 / float16 inputs whose
float32 images have zero low mantissa bits. Both order statistics that
torch.quantile's linear interpolation needs are selected in the same passes.

The kernel's grid is (sample, bit, block of rows) with the per-sample state (two
prefixes and two partial counts, 128 lanes wide) in a revisited output block. A
sample is laid out as (rows, 128); padding elements are NaN, whose bit pattern is
above every finite value's, so they are never counted for finite data (NaN in the
data itself gives an unspecified result; torch gives NaN).
The clip and divide are plain jnp: XLA fuses them into the sampler step.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..reference import quantile_ranks
from ._common import LANES, SUBLANES, cdiv, round_up

MAX_BLOCK_ROWS = 2048            # 1 MiB of float32 per block


def _low_zero_bits(dtype) -> int:
    """Trailing mantissa bits that are always 0 once a value of dtype is float32."""
    return {jnp.dtype(jnp.bfloat16): 16, jnp.dtype(jnp.float16): 13}.get(jnp.dtype(dtype), 0)


def _select_kernel(x_ref, state_ref, *, k_lo, k_hi, top_bit):
    r, c = pl.program_id(1), pl.program_id(2)

    @pl.when((r == 0) & (c == 0))
    def _init_prefix():
        state_ref[0] = jnp.zeros(state_ref.shape[1:], jnp.int32)

    @pl.when(c == 0)
    def _reset_counts():
        state_ref[0, 2:4, :] = jnp.zeros((2, LANES), jnp.int32)

    bit = jax.lax.shift_left(jnp.int32(1), top_bit - r)
    bits = jax.lax.bitcast_convert_type(jnp.abs(x_ref[0].astype(jnp.float32)), jnp.int32)
    for row, k in ((0, k_lo), (1, k_hi)):
        cand = state_ref[0, row:row + 1, :] | bit                     # (1, 128), lanes equal
        below = jnp.sum((bits < cand).astype(jnp.int32), axis=0, keepdims=True)
        state_ref[0, row + 2:row + 3, :] += below

        @pl.when(c == pl.num_programs(2) - 1)
        def _decide(row=row, k=k, cand=cand):
            total = jnp.sum(state_ref[0, row + 2:row + 3, :], axis=1, keepdims=True)
            state_ref[0, row:row + 1, :] = jnp.where(total <= k, cand, state_ref[0, row:row + 1, :])


def order_statistics(flat, k_lo: int, k_hi: int, *, interpret: bool = False):
    """The k_lo-th and k_hi-th smallest (0-based) of |flat| per row of (N, n): (N, 2)
    float32, by bitwise selection."""
    n_rows, n = flat.shape
    rows = cdiv(n, LANES)
    block = min(MAX_BLOCK_ROWS, round_up(rows, SUBLANES))
    rows_pad = round_up(rows, block)
    if rows_pad * LANES != n:
        flat = jnp.pad(flat, ((0, 0), (0, rows_pad * LANES - n)), constant_values=jnp.nan)
    x = flat.reshape(n_rows, rows_pad, LANES)
    low = _low_zero_bits(flat.dtype)
    top_bit = 30                                  # bit 31 is the sign, 0 for |x|
    state = pl.pallas_call(
        functools.partial(_select_kernel, k_lo=k_lo, k_hi=k_hi, top_bit=top_bit),
        grid=(n_rows, top_bit + 1 - low, rows_pad // block),
        in_specs=[pl.BlockSpec((1, block, LANES), lambda i, r, c: (i, c, 0))],
        out_specs=pl.BlockSpec((1, SUBLANES, LANES), lambda i, r, c: (i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((n_rows, SUBLANES, LANES), jnp.int32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
    )(x)
    return jax.lax.bitcast_convert_type(state[:, 0:2, 0], jnp.float32)


def percentile_abs(x0, percentile: float, *, interpret: bool = False):
    """quantile(|x0|, percentile) per sample over the non-batch axes, torch.quantile's
    linear interpolation, float32 (N,). Differentiable (see _percentile_jvp)."""
    return _percentile(x0.reshape(x0.shape[0], -1), float(percentile), interpret)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _percentile(flat, percentile, interpret):
    lo, hi, frac = quantile_ranks(flat.shape[1], percentile)
    v = order_statistics(flat, lo, hi, interpret=interpret)
    return v[:, 0] + (v[:, 1] - v[:, 0]) * frac


@_percentile.defjvp
def _percentile_jvp(percentile, interpret, primals, tangents):
    """An order statistic moves with the element that holds it: d|x|_(k) = sign(x_i) dx_i
    for the i with |x_i| = |x|_(k) (the tangent shared equally among ties)."""
    (flat,), (dflat,) = primals, tangents
    lo, hi, frac = quantile_ranks(flat.shape[1], percentile)
    v = order_statistics(flat, lo, hi, interpret=interpret)
    a = jnp.abs(flat.astype(jnp.float32))
    d = (jnp.sign(flat) * dflat).astype(jnp.float32)

    def moved(value):
        hit = a == value[:, None]
        return jnp.sum(jnp.where(hit, d, 0.0), axis=1) / jnp.maximum(jnp.sum(hit, axis=1), 1)

    t_lo, t_hi = moved(v[:, 0]), moved(v[:, 1])
    out = v[:, 0] + (v[:, 1] - v[:, 0]) * frac
    return out, t_lo + (t_hi - t_lo) * frac


def dynamic_threshold(x0, percentile: float = 0.995, min_value: float = 1.0, *,
                      interpret: bool = False):
    """clip(x0, -s, s) / s with s = max(percentile of |x0|, min_value) per sample."""
    s = jnp.maximum(percentile_abs(x0, percentile, interpret=interpret), min_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s
