"""GroupNorm + affine + FiLM + activation as Pallas kernels (channels-last), with
its backward through ``jax.custom_vjp`` (a raw pallas_call has no autodiff).

x is viewed as (N, S, C), S = all spatial positions; blocks are (1, rows, C) with
rows a multiple of 8 (or all of S) under ~1 MiB, C whole (TPU lanes), and the grid
(N, cdiv(S, rows)) masks the rows past S in the last block.

Forward, two passes over x:
1. ``_stats``: per (sample, channel) mean and sum of squared deviations, each block
   centred on its own mean and merged into the running values with Chan's formula
   (no E[x^2] - mean^2 cancellation). Groups are combined from the channels in jnp
   on (N, C) arrays.
2. ``_apply``: y = act(x * a + b) with per-(sample, channel) a, b folding the
   normalisation, the affine weight/bias and FiLM: one read of x, one write of y.
Backward, two passes over (x, dy): per-channel sums of dz and dz * x_hat (dz =
dy * act'(z), recomputed), then dx = dz * alpha + x * beta + gamma with
per-channel alpha, beta, gamma. Parameter gradients come from the sums.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..reference import stats_dtype
from ._common import activate, activation_grad, cdiv, row_block, valid_rows


def _blocks(x3):
    n, s, c = x3.shape
    rows = row_block(s, c * 4)
    return rows, (n, cdiv(s, rows))


def _params(dims):
    return pltpu.CompilerParams(dimension_semantics=dims)


def _tile_spec(rows, c):
    return pl.BlockSpec((1, rows, c), lambda i, j: (i, j, 0))


def _coef_spec(k, c):
    return pl.BlockSpec((1, k, c), lambda i, j: (i, 0, 0))


# ------------------------------------------------------------------------ kernels
def _stats_kernel(x_ref, mean_ref, m2_ref, *, rows, total):
    j = pl.program_id(1)
    cdt = mean_ref.dtype
    x = x_ref[0].astype(cdt)
    valid = valid_rows(j, rows, total)
    n_b = jnp.minimum(rows, total - j * rows).astype(cdt)
    mean_b = jnp.sum(jnp.where(valid, x, 0), axis=0, keepdims=True) / n_b
    d = jnp.where(valid, x - mean_b, 0)
    m2_b = jnp.sum(d * d, axis=0, keepdims=True)

    @pl.when(j == 0)
    def _first():
        mean_ref[0] = mean_b
        m2_ref[0] = m2_b

    @pl.when(j > 0)
    def _merge():
        n_a = (j * rows).astype(cdt)
        mean_a, m2_a = mean_ref[0], m2_ref[0]
        tot = n_a + n_b
        delta = mean_b - mean_a
        mean_ref[0] = mean_a + delta * (n_b / tot)
        m2_ref[0] = m2_a + m2_b + delta * delta * (n_a * n_b / tot)


def _apply_kernel(x_ref, coef_ref, y_ref, *, activation):
    cdt = coef_ref.dtype
    z = x_ref[0].astype(cdt) * coef_ref[0, 0:1, :] + coef_ref[0, 1:2, :]
    y_ref[0] = activate(z, activation).astype(y_ref.dtype)


def _bwd_sums_kernel(x_ref, dy_ref, coef_ref, dz_sum_ref, dzx_sum_ref, *, activation, rows,
                     total):
    j = pl.program_id(1)
    cdt = coef_ref.dtype
    x = x_ref[0].astype(cdt)
    a, b = coef_ref[0, 0:1, :], coef_ref[0, 1:2, :]
    mean, rstd = coef_ref[0, 2:3, :], coef_ref[0, 3:4, :]
    dz = dy_ref[0].astype(cdt) * activation_grad(x * a + b, activation)
    valid = valid_rows(j, rows, total)          # rows past S hold garbage: select, never multiply
    s_dz = jnp.sum(jnp.where(valid, dz, 0), axis=0, keepdims=True)
    s_dzx = jnp.sum(jnp.where(valid, dz * ((x - mean) * rstd), 0), axis=0, keepdims=True)

    @pl.when(j == 0)
    def _first():
        dz_sum_ref[0] = s_dz
        dzx_sum_ref[0] = s_dzx

    @pl.when(j > 0)
    def _add():
        dz_sum_ref[0] += s_dz
        dzx_sum_ref[0] += s_dzx


def _bwd_apply_kernel(x_ref, dy_ref, coef_ref, dx_ref, *, activation):
    cdt = coef_ref.dtype
    x = x_ref[0].astype(cdt)
    a, b = coef_ref[0, 0:1, :], coef_ref[0, 1:2, :]
    dz = dy_ref[0].astype(cdt) * activation_grad(x * a + b, activation)
    dx = dz * coef_ref[0, 2:3, :] + x * coef_ref[0, 3:4, :] + coef_ref[0, 4:5, :]
    dx_ref[0] = dx.astype(dx_ref.dtype)


# ---------------------------------------------------------------------- launchers
def channel_stats(x3, *, interpret=False):
    """(mean, m2) per (sample, channel), (N, C) each, of x3 (N, S, C)."""
    n, s, c = x3.shape
    rows, grid = _blocks(x3)
    cdt = stats_dtype(x3.dtype)
    out = jax.ShapeDtypeStruct((n, 1, c), cdt)
    mean, m2 = pl.pallas_call(
        functools.partial(_stats_kernel, rows=rows, total=s),
        grid=grid, in_specs=[_tile_spec(rows, c)],
        out_specs=[_coef_spec(1, c), _coef_spec(1, c)], out_shape=[out, out],
        compiler_params=_params(("parallel", "arbitrary")), interpret=interpret,
    )(x3)
    return mean[:, 0], m2[:, 0]


def _elementwise(kernel, x3, inputs, coef, out_dtype, interpret):
    n, s, c = x3.shape
    rows, grid = _blocks(x3)
    return pl.pallas_call(
        kernel, grid=grid,
        in_specs=[_tile_spec(rows, c)] * (1 + len(inputs)) + [_coef_spec(coef.shape[1], c)],
        out_specs=_tile_spec(rows, c), out_shape=jax.ShapeDtypeStruct(x3.shape, out_dtype),
        compiler_params=_params(("parallel", "parallel")), interpret=interpret,
    )(x3, *inputs, coef)


def _bwd_sums(x3, dy3, coef, activation, interpret):
    n, s, c = x3.shape
    rows, grid = _blocks(x3)
    out = jax.ShapeDtypeStruct((n, 1, c), coef.dtype)
    dz_sum, dzx_sum = pl.pallas_call(
        functools.partial(_bwd_sums_kernel, activation=activation, rows=rows, total=s),
        grid=grid, in_specs=[_tile_spec(rows, c), _tile_spec(rows, c), _coef_spec(4, c)],
        out_specs=[_coef_spec(1, c), _coef_spec(1, c)], out_shape=[out, out],
        compiler_params=_params(("parallel", "arbitrary")), interpret=interpret,
    )(x3, dy3, coef)
    return dz_sum[:, 0], dzx_sum[:, 0]


# --------------------------------------------------------------- the maths between
def _group_stats(mean_c, m2_c, s, num_groups, eps):
    """Per-channel (mean, m2) over S positions -> per-channel views (N, C) of the
    group mean and rstd."""
    n, c = mean_c.shape
    mc = mean_c.reshape(n, num_groups, -1)
    mean_g = mc.mean(axis=-1, keepdims=True)
    m2_g = (m2_c.reshape(n, num_groups, -1).sum(axis=-1, keepdims=True)
            + s * ((mc - mean_g) ** 2).sum(axis=-1, keepdims=True))
    var = m2_g / (s * mc.shape[-1])
    rstd = jax.lax.rsqrt(var + eps)
    return (jnp.broadcast_to(mean_g, mc.shape).reshape(n, c),
            jnp.broadcast_to(rstd, mc.shape).reshape(n, c))


def _film(weight, bias, scale, shift, n, c, cdt):
    w = jnp.ones((c,), cdt) if weight is None else weight.astype(cdt)
    b = jnp.zeros((c,), cdt) if bias is None else bias.astype(cdt)
    g = jnp.ones((n, c), cdt) if scale is None else 1 + scale.astype(cdt)
    h = jnp.zeros((n, c), cdt) if shift is None else shift.astype(cdt)
    return w, b, g, h


def _forward(x, num_groups, weight, bias, eps, scale, shift, activation, interpret):
    n, c = x.shape[0], x.shape[-1]
    x3 = x.reshape(n, -1, c)
    s = x3.shape[1]
    mean_c, m2_c = channel_stats(x3, interpret=interpret)
    mean, rstd = _group_stats(mean_c, m2_c, s, num_groups, eps)
    w, b, g, h = _film(weight, bias, scale, shift, n, c, mean.dtype)
    a = rstd * w * g
    off = (b - mean * rstd * w) * g + h
    coef = jnp.stack([a, off], axis=1)
    y = _elementwise(functools.partial(_apply_kernel, activation=activation), x3, [], coef,
                     x.dtype, interpret)
    return y.reshape(x.shape), (mean, rstd, coef)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 4, 7, 8))
def group_norm_silu(x, num_groups, weight, bias, eps, scale, shift, activation, interpret):
    """The Pallas GroupNorm(+FiLM)(+activation) of x (N, *spatial, C); the argument
    meaning is that of ``imagen_fast.jax.ops.group_norm_silu`` (which checks them).
    ``interpret`` runs the kernels in Pallas' interpreter (any platform)."""
    return _forward(x, num_groups, weight, bias, eps, scale, shift, activation, interpret)[0]


def _gn_fwd(x, num_groups, weight, bias, eps, scale, shift, activation, interpret):
    y, (mean, rstd, coef) = _forward(x, num_groups, weight, bias, eps, scale, shift,
                                     activation, interpret)
    return y, (x, weight, bias, scale, shift, mean, rstd, coef)


def _gn_bwd(num_groups, eps, activation, interpret, res, dy):
    x, weight, bias, scale, shift, mean, rstd, coef = res
    n, c = x.shape[0], x.shape[-1]
    x3, dy3 = x.reshape(n, -1, c), dy.reshape(n, -1, c)
    s = x3.shape[1]
    cdt = mean.dtype
    dz_sum, dzx_sum = _bwd_sums(x3, dy3, jnp.concatenate([coef, jnp.stack([mean, rstd], 1)], 1),
                                activation, interpret)
    w, b, g, _ = _film(weight, bias, scale, shift, n, c, cdt)
    # x_hat's gradient is dz * g * w; its group sums with and without x_hat:
    m = s * (c // num_groups)
    p = (g * w * dz_sum).reshape(n, num_groups, -1).sum(-1, keepdims=True)
    q = (g * w * dzx_sum).reshape(n, num_groups, -1).sum(-1, keepdims=True)
    p = jnp.broadcast_to(p, (n, num_groups, c // num_groups)).reshape(n, c) / m
    q = jnp.broadcast_to(q, (n, num_groups, c // num_groups)).reshape(n, c) / m
    alpha = rstd * g * w
    beta = -rstd * rstd * q
    gamma = -rstd * p + mean * rstd * rstd * q
    bwd_coef = jnp.concatenate([coef, jnp.stack([alpha, beta, gamma], 1)], 1)
    dx = _elementwise(functools.partial(_bwd_apply_kernel, activation=activation), x3, [dy3],
                      bwd_coef, x.dtype, interpret).reshape(x.shape)
    dweight = None if weight is None else (g * dzx_sum).sum(0).astype(weight.dtype)
    dbias = None if bias is None else (g * dz_sum).sum(0).astype(bias.dtype)
    dscale = None if scale is None else (w * dzx_sum + b * dz_sum).astype(scale.dtype)
    dshift = None if shift is None else dz_sum.astype(shift.dtype)
    return dx, dweight, dbias, dscale, dshift


group_norm_silu.defvjp(_gn_fwd, _gn_bwd)
