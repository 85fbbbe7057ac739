"""GroupNorm + FiLM + activation (silu / exact gelu / none), forward and backward.

    y = act(((x - mean_g) * rstd_g * w_c + b_c) * (1 + scale_nc) + shift_nc)

x is (N, C, *spatial) seen as (N, C, S). Two layouts, one set of kernels:
contiguous (channel stride S, spatial stride 1) and channels-last (channel stride 1,
spatial stride C); CL is a compile-time flag so the unit stride is known to the
compiler and loads vectorise along it.

Work decomposition. A program owns GB whole groups of one sample (GB > 1 when groups
are small, so a channels-last tile still covers >= 64 contiguous channels) and one
chunk of the spatial axis. Tiles are (GB * CB rows = channels, BS columns = spatial);
per-group sums are row sums reshaped to (GB, CB). Three plans, chosen per shape:

* fused: the program's whole group block fits one tile -> one read of x, one write.
* looped (SPLIT == 1): each program loops over its groups twice (statistics, then
  normalise); the second read is of data the same program just read (L2).
* split (N * G small against the SM count): the spatial axis is cut into SPLIT
  chunks; a stats kernel writes per-chunk (mean, M2) partials, the apply kernel
  merges them (Chan et al.'s parallel formula, float32) and walks the chunks in
  reverse launch order so the most recently read part of x is still in L2.

Statistics: per tile, the tile mean and sum of squared deviations are computed in
registers and merged into running (count, mean, M2) with Chan's update: never
E[x^2] - mean^2. The forward saves only (mean, rstd) (float32, float64 for float64).

Backward: with xh = (x - mean) * rstd, h = (xh * w + b) * (1 + s) + sh, dh = gy *
act'(h), everything reduces to two per-(n, c) sums P1 = sum_s dh and P2 = sum_s dh*xh:
    g_shift = P1, g_scale = w P2 + b P1, g_bias = sum_n (1+s) P1, g_weight = sum_n (1+s) P2
    gx = rstd * (dh*A - c1/M - xh * c2/M),  A = w (1+s),  c1 = sum_{c in g} A P1,
    c2 = sum_{c in g} A P2,  M = (C/G) * S.
Kernels: reduce (partials of P1, P2 per spatial chunk), finalize (per (n, group
block): merges the chunks, writes the (N, C) parameter-gradient pieces and c1, c2),
dx (recomputes xh and dh, writes gx); or one fused kernel when the block fits a tile.
"""
from __future__ import annotations

from typing import Dict

import torch
import triton
import triton.language as tl

from ..layout import ACTIVATION_CODES, like_layout, stats_dtype
from ..registry import register
from . import _common as cm
from ._common import activation, activation_grad, compute_dtype, geometry, norm_supports

# Test hook: force plan fields (e.g. {"split": 3, "block_s": 16}); see force_plan().
_FORCED: Dict[str, int] = {}


def force_plan(**fields):
    """Context manager for tests: override fields of the launch plan."""
    return cm.forced(_FORCED, **fields)


# ------------------------------------------------------------------------ helpers
@triton.jit
def _rows(g0, cb, G, Cg, GB: tl.constexpr, CB: tl.constexpr):
    """Row r of a tile -> (channel, valid) for groups g0.. and channel sub-block cb."""
    r = tl.arange(0, GB * CB)
    j = cb * CB + (r % CB)
    g = g0 + r // CB
    return g * Cg + j, (g < G) & (j < Cg)


@triton.jit
def _offsets(c, s, C, S, CL: tl.constexpr):
    """In-sample element offsets of a (rows = channels, cols = spatial) tile."""
    if CL:
        return s[None, :] * C + c[:, None]
    else:
        return c[:, None] * S + s[None, :]


@triton.jit
def _group_sum(v, GB: tl.constexpr, CB: tl.constexpr):
    return tl.sum(tl.reshape(v, (GB, CB)), axis=1)


@triton.jit
def _to_rows(v, GB: tl.constexpr, CB: tl.constexpr):
    return tl.reshape(tl.broadcast_to(v[:, None], (GB, CB)), (GB * CB,))


@triton.jit
def _row_params(n, c, valid, C, w_ptr, b_ptr, sc_ptr, sh_ptr, CDT: tl.constexpr,
                HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr,
                HAS_SH: tl.constexpr):
    """Per-row w, b, (1 + scale), shift in the compute dtype (identity when absent)."""
    if HAS_W:
        w = tl.load(w_ptr + c, mask=valid, other=0.0).to(CDT)
    else:
        w = tl.full(c.shape, 1.0, CDT)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=valid, other=0.0).to(CDT)
    else:
        b = tl.zeros(c.shape, CDT)
    if HAS_SC:
        film = 1.0 + tl.load(sc_ptr + n * C + c, mask=valid, other=0.0).to(CDT)
    else:
        film = tl.full(c.shape, 1.0, CDT)
    if HAS_SH:
        sh = tl.load(sh_ptr + n * C + c, mask=valid, other=0.0).to(CDT)
    else:
        sh = tl.zeros(c.shape, CDT)
    return w, b, film, sh


@triton.jit
def _as_float(v, CDT: tl.constexpr):
    """An int (a tensor, or a constexpr when Triton specialised an argument equal
    to 1) as a CDT scalar, exactly."""
    return v + tl.zeros([], CDT)


@triton.jit
def _rsqrt(v):
    if v.dtype == tl.float64:
        return 1.0 / tl.sqrt(v)
    else:
        return 1.0 / tl.sqrt_rn(v)


@triton.jit
def _decode(pid, SPLIT, GBLK):
    split = pid % SPLIT
    t = pid // SPLIT
    return t // GBLK, t % GBLK, split


# ----------------------------------------------------------------------- forward
@triton.jit
def _tile_stats(x_ptr, base, c, valid, s0, s_end, nrow, C, S, GB: tl.constexpr,
                CB: tl.constexpr, BS: tl.constexpr, CL: tl.constexpr, CDT: tl.constexpr):
    """(count, mean[GB], M2[GB]) of one tile; count is the same for every group."""
    s = s0 + tl.arange(0, BS)
    m = valid[:, None] & (s < s_end)[None, :]
    x = tl.load(x_ptr + base + _offsets(c, s, C, S, CL), mask=m, other=0.0).to(CDT)
    cnt = (nrow * tl.minimum(BS, s_end - s0)).to(CDT)
    mean = _group_sum(tl.sum(x, axis=1), GB, CB) / cnt
    d = tl.where(m, x - _to_rows(mean, GB, CB)[:, None], 0.0)
    return cnt, mean, _group_sum(tl.sum(d * d, axis=1), GB, CB)


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n_ab = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / tl.maximum(n_ab, 1.0)
    return n_ab, mean_a + delta * frac, m2_a + m2_b + delta * delta * (n_a * frac)


@triton.jit
def _chunk_stats(x_ptr, base, n, g0, G, Cg, C, S, s_begin, s_end, CDT: tl.constexpr,
                 GB: tl.constexpr, CB: tl.constexpr, NCB: tl.constexpr, BS: tl.constexpr,
                 CL: tl.constexpr):
    cnt = tl.zeros([GB], CDT).to(CDT)  # same for all groups; kept as a vector for the merge
    mean = tl.zeros([GB], CDT)
    m2 = tl.zeros([GB], CDT)
    for cb in range(NCB):
        c, valid = _rows(g0, cb, G, Cg, GB, CB)
        nrow = tl.minimum(CB, Cg - cb * CB)
        for s0 in range(s_begin, s_end, BS):
            tc, tm, tm2 = _tile_stats(x_ptr, base, c, valid, s0, s_end, nrow, C, S, GB, CB,
                                      BS, CL, CDT)
            cnt, mean, m2 = _chan_merge(cnt, mean, m2, tc, tm, tm2)
    return cnt, mean, m2


@triton.jit
def _gn_fwd_stats_kernel(x_ptr, part_ptr, C, S, G, Cg, GBLK, SPLIT, CHUNK,
                         CDT: tl.constexpr, GB: tl.constexpr, CB: tl.constexpr,
                         NCB: tl.constexpr, BS: tl.constexpr, CL: tl.constexpr):
    n, gblk, split = _decode(tl.program_id(0), SPLIT, GBLK)
    g0 = gblk * GB
    base = n.to(tl.int64) * C * S
    s_begin = split * CHUNK
    s_end = tl.minimum(s_begin + CHUNK, S)
    _, mean, m2 = _chunk_stats(x_ptr, base, n, g0, G, Cg, C, S, s_begin, s_end, CDT, GB,
                               CB, NCB, BS, CL)
    g = g0 + tl.arange(0, GB)
    off = ((n * SPLIT + split) * G + g) * 2
    tl.store(part_ptr + off, mean, mask=g < G)
    tl.store(part_ptr + off + 1, m2, mask=g < G)


@triton.jit
def _fwd_partials(part_ptr, n, i0, gvec, G, S, Cg, SPLIT, CHUNK, CDT: tl.constexpr,
                  SB: tl.constexpr):
    """Chunks i0..i0+SB of the stats kernel's partials: (mean, M2, count, mask) tiles
    [SB, GB]; rows past SPLIT and groups past G are masked (count 0)."""
    i = i0 + tl.arange(0, SB)
    pmask = (i < SPLIT)[:, None] & (gvec < G)[None, :]
    off = ((n * SPLIT + i[:, None]) * G + gvec[None, :]) * 2
    pm = tl.load(part_ptr + off, mask=pmask, other=0.0).to(CDT)
    pm2 = tl.load(part_ptr + off + 1, mask=pmask, other=0.0).to(CDT)
    pc = tl.where(i < SPLIT, Cg * (tl.minimum(i * CHUNK + CHUNK, S) - i * CHUNK), 0)
    return pm, pm2, _as_float(pc, CDT)[:, None], pmask


@triton.jit
def _gn_fwd_kernel(x_ptr, y_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, mean_ptr, rstd_ptr, part_ptr,
                   C, S, G, Cg, GBLK, SPLIT, CHUNK, eps,
                   CDT: tl.constexpr, GB: tl.constexpr, CB: tl.constexpr, NCB: tl.constexpr,
                   BS: tl.constexpr, CL: tl.constexpr, MODE: tl.constexpr,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr,
                   HAS_SH: tl.constexpr, ACT: tl.constexpr, SB: tl.constexpr):
    """MODE 0: fused single tile; 1: stats loop then apply loop; 2: merge partials
    (SB chunks' partials at a time)."""
    pid = tl.program_id(0)
    if MODE == 2:
        pid = tl.num_programs(0) - 1 - pid  # reverse order: recently read chunks first
    n, gblk, split = _decode(pid, SPLIT, GBLK)
    g0 = gblk * GB
    gvec = g0 + tl.arange(0, GB)
    base = n.to(tl.int64) * C * S
    s_begin = split * CHUNK
    s_end = tl.minimum(s_begin + CHUNK, S)
    M = _as_float(Cg * S, CDT)

    if MODE == 0:
        c, valid = _rows(g0, 0, G, Cg, GB, CB)
        s = tl.arange(0, BS)
        m = valid[:, None] & (s < S)[None, :]
        offs = base + _offsets(c, s, C, S, CL)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(CDT)
        mean = _group_sum(tl.sum(x, axis=1), GB, CB) / M
        d = tl.where(m, x - _to_rows(mean, GB, CB)[:, None], 0.0)
        var = _group_sum(tl.sum(d * d, axis=1), GB, CB) / M
        rstd = _rsqrt(var + eps)
        w, b, film, sh = _row_params(n, c, valid, C, w_ptr, b_ptr, sc_ptr, sh_ptr, CDT,
                                     HAS_W, HAS_B, HAS_SC, HAS_SH)
        a = _to_rows(rstd, GB, CB) * w * film
        h = d * a[:, None] + (b * film + sh)[:, None]
        tl.store(y_ptr + offs, activation(h, ACT).to(y_ptr.dtype.element_ty), mask=m)
    else:
        if MODE == 1:
            _, mean, m2 = _chunk_stats(x_ptr, base, n, g0, G, Cg, C, S, 0, S, CDT, GB, CB,
                                       NCB, BS, CL)
        else:
            # mean = sum n_i m_i / n, then M2 = sum M2_i + n_i (m_i - mean)^2, over the
            # chunks' partials SB at a time (a [SPLIT, GB] tile would spill at large SPLIT)
            acc = tl.zeros([GB], CDT)
            for i0 in range(0, SPLIT, SB):
                pm, _pm2, pc, _pmask = _fwd_partials(part_ptr, n, i0, gvec, G, S, Cg, SPLIT,
                                                     CHUNK, CDT, SB)
                acc += tl.sum(pc * pm, axis=0)
            mean = acc / M
            m2 = tl.zeros([GB], CDT)
            for i0 in range(0, SPLIT, SB):
                pm, pm2, pc, pmask = _fwd_partials(part_ptr, n, i0, gvec, G, S, Cg, SPLIT,
                                                   CHUNK, CDT, SB)
                dev = tl.where(pmask, pm - mean[None, :], 0.0)
                m2 += tl.sum(pm2 + pc * dev * dev, axis=0)
        rstd = _rsqrt(m2 / M + eps)
        for cb in range(NCB):
            c, valid = _rows(g0, cb, G, Cg, GB, CB)
            w, b, film, sh = _row_params(n, c, valid, C, w_ptr, b_ptr, sc_ptr, sh_ptr, CDT,
                                         HAS_W, HAS_B, HAS_SC, HAS_SH)
            mr = _to_rows(mean, GB, CB)
            a = _to_rows(rstd, GB, CB) * w * film
            bb = b * film + sh
            for s0 in range(s_begin, s_end, BS):
                s = s0 + tl.arange(0, BS)
                m = valid[:, None] & (s < s_end)[None, :]
                offs = base + _offsets(c, s, C, S, CL)
                x = tl.load(x_ptr + offs, mask=m, other=0.0).to(CDT)
                h = (x - mr[:, None]) * a[:, None] + bb[:, None]
                tl.store(y_ptr + offs, activation(h, ACT).to(y_ptr.dtype.element_ty), mask=m)
    if split == 0:
        tl.store(mean_ptr + n * G + gvec, mean.to(mean_ptr.dtype.element_ty), mask=gvec < G)
        tl.store(rstd_ptr + n * G + gvec, rstd.to(rstd_ptr.dtype.element_ty), mask=gvec < G)


# ---------------------------------------------------------------------- backward
@triton.jit
def _tile_dh(x_ptr, gy_ptr, base, c, valid, s, s_end, C, S, mr, rr, w, b, film, sh,
             CDT: tl.constexpr, CL: tl.constexpr, ACT: tl.constexpr):
    """(xh, dh, mask, offsets) of one tile; dh = gy * act'(h) recomputed from x."""
    m = valid[:, None] & (s < s_end)[None, :]
    offs = base + _offsets(c, s, C, S, CL)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(CDT)
    gy = tl.load(gy_ptr + offs, mask=m, other=0.0).to(CDT)
    xh = (x - mr[:, None]) * rr[:, None]
    if ACT == 0:
        dh = gy
    else:
        h = (xh * w[:, None] + b[:, None]) * film[:, None] + sh[:, None]
        dh = gy * activation_grad(h, ACT)
    dh = tl.where(m, dh, 0.0)
    return xh, dh, m, offs


@triton.jit
def _load_group_stats(mean_ptr, rstd_ptr, n, gvec, G, GB: tl.constexpr, CB: tl.constexpr,
                      CDT: tl.constexpr):
    mean = tl.load(mean_ptr + n * G + gvec, mask=gvec < G, other=0.0).to(CDT)
    rstd = tl.load(rstd_ptr + n * G + gvec, mask=gvec < G, other=0.0).to(CDT)
    return _to_rows(mean, GB, CB), _to_rows(rstd, GB, CB)


@triton.jit
def _store_param_grads(n, c, valid, C, p1, p2, w, b, film, gsh_ptr, gsc_ptr, gw_ptr, gb_ptr,
                       NEED_W: tl.constexpr, NEED_B: tl.constexpr, NEED_SC: tl.constexpr,
                       NEED_SH: tl.constexpr):
    """Per (n, c): g_shift, g_scale and the per-sample pieces of g_weight, g_bias."""
    off = n * C + c
    if NEED_SH:
        tl.store(gsh_ptr + off, p1, mask=valid)
    if NEED_SC:
        tl.store(gsc_ptr + off, w * p2 + b * p1, mask=valid)
    if NEED_W:
        tl.store(gw_ptr + off, film * p2, mask=valid)
    if NEED_B:
        tl.store(gb_ptr + off, film * p1, mask=valid)


@triton.jit
def _gn_bwd_reduce_kernel(gy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr,
                          part_ptr, C, S, G, Cg, GBLK, SPLIT, CHUNK, PST,
                          CDT: tl.constexpr, GB: tl.constexpr, CB: tl.constexpr,
                          NCB: tl.constexpr, BS: tl.constexpr, CL: tl.constexpr,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr,
                          HAS_SH: tl.constexpr, ACT: tl.constexpr):
    """part[k, n, split, c] (k = 0, 1) = chunk sums of dh and dh * xh; PST = N*SPLIT*C."""
    n, gblk, split = _decode(tl.program_id(0), SPLIT, GBLK)
    g0 = gblk * GB
    gvec = g0 + tl.arange(0, GB)
    base = n.to(tl.int64) * C * S
    s_begin = split * CHUNK
    s_end = tl.minimum(s_begin + CHUNK, S)
    mr, rr = _load_group_stats(mean_ptr, rstd_ptr, n, gvec, G, GB, CB, CDT)
    for cb in range(NCB):
        c, valid = _rows(g0, cb, G, Cg, GB, CB)
        w, b, film, sh = _row_params(n, c, valid, C, w_ptr, b_ptr, sc_ptr, sh_ptr, CDT,
                                     HAS_W, HAS_B, HAS_SC, HAS_SH)
        p1 = tl.zeros([GB * CB], CDT)
        p2 = tl.zeros([GB * CB], CDT)
        for s0 in range(s_begin, s_end, BS):
            s = s0 + tl.arange(0, BS)
            xh, dh, m, offs = _tile_dh(x_ptr, gy_ptr, base, c, valid, s, s_end, C, S, mr,
                                       rr, w, b, film, sh, CDT, CL, ACT)
            p1 += tl.sum(dh, axis=1)
            p2 += tl.sum(tl.where(m, dh * xh, 0.0), axis=1)
        off = (n * SPLIT + split) * C + c
        tl.store(part_ptr + off, p1, mask=valid)
        tl.store(part_ptr + PST + off, p2, mask=valid)


@triton.jit
def _gn_bwd_finalize_kernel(part_ptr, w_ptr, b_ptr, sc_ptr, c12_ptr, gsh_ptr, gsc_ptr, gw_ptr,
                            gb_ptr, C, G, Cg, GBLK, SPLIT, PST,
                            CDT: tl.constexpr, GB: tl.constexpr, CB: tl.constexpr,
                            NCB: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                            HAS_SC: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                            NEED_SC: tl.constexpr, NEED_SH: tl.constexpr, SB: tl.constexpr):
    """Merge the chunk partials (SB chunks at a time: a [SPLIT, rows] tile would spill at
    large SPLIT); per (n, c) parameter-gradient pieces; c1, c2 per group."""
    pid = tl.program_id(0)
    n = pid // GBLK
    g0 = (pid % GBLK) * GB
    gvec = g0 + tl.arange(0, GB)
    c1 = tl.zeros([GB], CDT)
    c2 = tl.zeros([GB], CDT)
    for cb in range(NCB):
        c, valid = _rows(g0, cb, G, Cg, GB, CB)
        w, b, film, _ = _row_params(n, c, valid, C, w_ptr, b_ptr, sc_ptr, sc_ptr, CDT,
                                    HAS_W, HAS_B, HAS_SC, False)
        p1 = tl.zeros([GB * CB], CDT)
        p2 = tl.zeros([GB * CB], CDT)
        for i0 in range(0, SPLIT, SB):
            i = i0 + tl.arange(0, SB)
            off = (n * SPLIT + i[:, None]) * C + c[None, :]
            pmask = (i < SPLIT)[:, None] & valid[None, :]
            p1 += tl.sum(tl.load(part_ptr + off, mask=pmask, other=0.0).to(CDT), axis=0)
            p2 += tl.sum(tl.load(part_ptr + PST + off, mask=pmask, other=0.0).to(CDT), axis=0)
        _store_param_grads(n, c, valid, C, p1, p2, w, b, film, gsh_ptr, gsc_ptr, gw_ptr,
                           gb_ptr, NEED_W, NEED_B, NEED_SC, NEED_SH)
        a = w * film
        c1 += _group_sum(a * p1, GB, CB)
        c2 += _group_sum(a * p2, GB, CB)
    tl.store(c12_ptr + (n * G + gvec) * 2, c1, mask=gvec < G)
    tl.store(c12_ptr + (n * G + gvec) * 2 + 1, c2, mask=gvec < G)


@triton.jit
def _gn_bwd_dx_kernel(gy_ptr, x_ptr, gx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr,
                      c12_ptr, C, S, G, Cg, GBLK, SPLIT, CHUNK,
                      CDT: tl.constexpr, GB: tl.constexpr, CB: tl.constexpr,
                      NCB: tl.constexpr, BS: tl.constexpr, CL: tl.constexpr,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr,
                      HAS_SH: tl.constexpr, ACT: tl.constexpr):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)  # reverse of the reduce kernel's order
    n, gblk, split = _decode(pid, SPLIT, GBLK)
    g0 = gblk * GB
    gvec = g0 + tl.arange(0, GB)
    base = n.to(tl.int64) * C * S
    s_begin = split * CHUNK
    s_end = tl.minimum(s_begin + CHUNK, S)
    inv_m = 1.0 / _as_float(Cg * S, CDT)
    mr, rr = _load_group_stats(mean_ptr, rstd_ptr, n, gvec, G, GB, CB, CDT)
    c1 = tl.load(c12_ptr + (n * G + gvec) * 2, mask=gvec < G, other=0.0).to(CDT)
    c2 = tl.load(c12_ptr + (n * G + gvec) * 2 + 1, mask=gvec < G, other=0.0).to(CDT)
    c1r = _to_rows(c1, GB, CB) * inv_m
    c2r = _to_rows(c2, GB, CB) * inv_m
    for cb in range(NCB):
        c, valid = _rows(g0, cb, G, Cg, GB, CB)
        w, b, film, sh = _row_params(n, c, valid, C, w_ptr, b_ptr, sc_ptr, sh_ptr, CDT,
                                     HAS_W, HAS_B, HAS_SC, HAS_SH)
        a = w * film
        for s0 in range(s_begin, s_end, BS):
            s = s0 + tl.arange(0, BS)
            xh, dh, m, offs = _tile_dh(x_ptr, gy_ptr, base, c, valid, s, s_end, C, S, mr,
                                       rr, w, b, film, sh, CDT, CL, ACT)
            gx = rr[:, None] * (dh * a[:, None] - c1r[:, None] - xh * c2r[:, None])
            tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gn_bwd_fused_kernel(gy_ptr, x_ptr, gx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr,
                         sh_ptr, gsh_ptr, gsc_ptr, gw_ptr, gb_ptr, C, S, G, Cg, GBLK,
                         CDT: tl.constexpr, GB: tl.constexpr, CB: tl.constexpr,
                         BS: tl.constexpr, CL: tl.constexpr, HAS_W: tl.constexpr,
                         HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr,
                         ACT: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr,
                         NEED_B: tl.constexpr, NEED_SC: tl.constexpr, NEED_SH: tl.constexpr):
    """The whole group block in one tile: x and gy read once."""
    pid = tl.program_id(0)
    n = pid // GBLK
    g0 = (pid % GBLK) * GB
    gvec = g0 + tl.arange(0, GB)
    base = n.to(tl.int64) * C * S
    mr, rr = _load_group_stats(mean_ptr, rstd_ptr, n, gvec, G, GB, CB, CDT)
    c, valid = _rows(g0, 0, G, Cg, GB, CB)
    w, b, film, sh = _row_params(n, c, valid, C, w_ptr, b_ptr, sc_ptr, sh_ptr, CDT,
                                 HAS_W, HAS_B, HAS_SC, HAS_SH)
    s = tl.arange(0, BS)
    xh, dh, m, offs = _tile_dh(x_ptr, gy_ptr, base, c, valid, s, S, C, S, mr, rr, w, b, film,
                               sh, CDT, CL, ACT)
    p1 = tl.sum(dh, axis=1)
    p2 = tl.sum(tl.where(m, dh * xh, 0.0), axis=1)
    _store_param_grads(n, c, valid, C, p1, p2, w, b, film, gsh_ptr, gsc_ptr, gw_ptr, gb_ptr,
                       NEED_W, NEED_B, NEED_SC, NEED_SH)
    if NEED_X:
        inv_m = 1.0 / _as_float(Cg * S, CDT)
        a = w * film
        c1r = _to_rows(_group_sum(a * p1, GB, CB), GB, CB) * inv_m
        c2r = _to_rows(_group_sum(a * p2, GB, CB), GB, CB) * inv_m
        gx = rr[:, None] * (dh * a[:, None] - c1r[:, None] - xh * c2r[:, None])
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------ launch
class _Plan:
    __slots__ = ("GB", "CB", "NCB", "BS", "GBLK", "SPLIT", "CHUNK", "mode", "num_warps")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    def __repr__(self):
        return "_Plan(" + ", ".join(f"{k}={getattr(self, k)}" for k in self.__slots__) + ")"


# (loop tile elements, largest single tile for the fused plan, num_warps; make_plan
# doubles the warps, up to 16, while a tile has over 16 elements a thread); the first of
# each list is the default: it compiles without spills on sm_80 and sm_90
# (benchmarks/gpu_compile.py). The forward's default loop tile is 2048 elements (8 a
# thread): at 4096 the split plan's stats kernel spilled in float32 on sm_90.
MIN_CHUNK = 8192
# The split plan's stats kernel (it only reads and reduces) runs at 16 warps: at 8, ptxas
# spilled 4 B on sm_90 with several channel blocks (NCB > 1), at any tile size tried.
STATS_WARPS = 16
_FWD_CONFIGS = [(2048, 8192, 8), (4096, 8192, 8), (2048, 4096, 4), (4096, 8192, 16),
                (8192, 16384, 16)]
_BWD_CONFIGS = [(2048, 4096, 8), (1024, 2048, 4), (4096, 4096, 8), (2048, 8192, 16)]


def make_plan(N: int, C: int, S: int, G: int, channels_last: bool, sms: int, cfg) -> _Plan:
    """Launch plan for x seen as (N, C, S) with G groups (see the module docstring)."""
    tile, fused_max, num_warps = cfg
    f = _FORCED
    cg = C // G
    cg_p2, s_p2, g_p2 = cm.next_pow2(cg), cm.next_pow2(S), cm.next_pow2(G)
    forced_rows = "channel_block" in f or "groups_per_program" in f
    fused = False
    if cg_p2 * s_p2 <= fused_max and not forced_rows:
        # One read of x: a whole group block in one tile. Channels-last prefers >= 128
        # contiguous channels a tile; contiguous rows are already contiguous.
        cb = cg_p2
        gb = min(g_p2, max(1, (128 if channels_last else tile // s_p2) // cb))
        while gb > 1 and gb * cb * s_p2 > fused_max:
            gb //= 2
        fused = True
    elif channels_last:
        cb = min(cg_p2, 256)
        gb = min(g_p2, max(1, 128 // cb)) if cb == cg_p2 else 1
    else:
        # rows of >= 256 contiguous pixels (or the whole plane), as many channels as fit
        cb = min(cg_p2, max(1, tile // min(s_p2, 256)))
        gb = min(g_p2, max(1, tile // (cb * s_p2))) if cb == cg_p2 else 1
    cb = f.get("channel_block", cb)
    gb = f.get("groups_per_program", gb if cb == cg_p2 else 1)
    if gb > 1 and cb < cg_p2:
        raise ValueError("groups_per_program > 1 needs channel_block >= next_pow2(C/G)")
    ncb = cm.cdiv(cg, cb)
    if forced_rows:
        fused = ncb == 1 and gb * cb * s_p2 <= fused_max
    rows = gb * cb
    gblk = cm.cdiv(G, gb)
    bs = s_p2 if fused else min(s_p2, max(1, tile // rows))
    bs = f.get("block_s", bs)
    fused = f.get("fused", fused) and ncb == 1 and bs >= S
    split = 1
    if not fused:
        tiles = cm.cdiv(S, bs)
        programs = N * gblk
        if programs < 2 * sms:
            # enough programs for the card, but >= MIN_CHUNK elements each, so the
            # partials stay few
            most = max(1, (min(gb, G) * cg * S) // MIN_CHUNK)
            split = max(1, min(tiles, cm.cdiv(4 * sms, programs), most))
        split = max(1, min(tiles, f.get("split", split)))
        chunk = cm.cdiv(tiles, split) * bs
        split = cm.cdiv(S, chunk)
    else:
        chunk = S
    mode = "fused" if fused else ("looped" if split == 1 else "split")
    # at most 16 elements of a tile per thread (a fused tile may be twice the loop tile):
    # 32 spilled registers on sm_80 (benchmarks/gpu_compile.py)
    while num_warps < 16 and rows * bs > 16 * 32 * num_warps:
        num_warps *= 2
    return _Plan(GB=gb, CB=cb, NCB=ncb, BS=bs, GBLK=gblk, SPLIT=split, CHUNK=chunk,
                 mode=mode, num_warps=num_warps)


def _split_block(split: int, width: int, num_warps: int, per_thread: int) -> int:
    """Rows of the [rows, width] tiles that merge per-chunk partials: a power of two,
    at most next_pow2(split), with at most per_thread elements a thread, so that a
    large split count loops instead of holding one huge tile (which spills)."""
    most = max(1, per_thread * 32 * num_warps // width)
    return min(cm.next_pow2(split), 1 << (most.bit_length() - 1))


def _finalize_warps(rows: int) -> int:
    """The finalize kernel keeps ~8 per-row vectors: 4 warps up to 512 rows, then more."""
    return max(4, min(16, rows // 128))


def _tune_key(x, G, extra):
    n, c, s, cl = geometry(x)
    return (cl, x.dtype, cm.bucket(s), cm.bucket(c // G), cm.bucket(n * G)) + tuple(extra)


@register("group_norm_silu_fwd", "triton", supports=norm_supports)
def group_norm_silu_fwd(x, num_groups, weight, bias, eps, scale, shift, activation):
    G = int(num_groups)
    N, C, S, cl = geometry(x)
    sdt = stats_dtype(x)
    y = torch.empty_like(x)
    mean = torch.empty((N, G), dtype=sdt, device=x.device)
    rstd = torch.empty((N, G), dtype=sdt, device=x.device)
    act = ACTIVATION_CODES[activation]
    cdt = compute_dtype(x)
    sms = cm.sm_count(x.device)
    d = mean  # stands in for absent optional pointers (never read)

    def run(cfg):
        p = make_plan(N, C, S, G, cl, sms, cfg)
        part = d
        if p.mode == "split":
            part = torch.empty((N, p.SPLIT, G, 2), dtype=sdt, device=x.device)
            _gn_fwd_stats_kernel[(N * p.GBLK * p.SPLIT,)](
                x, part, C, S, G, C // G, p.GBLK, p.SPLIT, p.CHUNK, CDT=cdt, GB=p.GB,
                CB=p.CB, NCB=p.NCB, BS=p.BS, CL=cl, num_warps=STATS_WARPS)
        mode = {"fused": 0, "looped": 1, "split": 2}[p.mode]
        _gn_fwd_kernel[(N * p.GBLK * p.SPLIT,)](
            x, y, weight if weight is not None else d, bias if bias is not None else d,
            scale if scale is not None else d, shift if shift is not None else d,
            mean, rstd, part, C, S, G, C // G, p.GBLK, p.SPLIT, p.CHUNK, float(eps),
            CDT=cdt, GB=p.GB, CB=p.CB, NCB=p.NCB, BS=p.BS, CL=cl, MODE=mode,
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_SC=scale is not None,
            HAS_SH=shift is not None, ACT=act, SB=_split_block(p.SPLIT, p.GB, p.num_warps, 4),
            num_warps=p.num_warps)

    key = _tune_key(x, G, (act, weight is not None, scale is not None))
    cfg = cm.pick_config("group_norm_fwd", key, x.device, _FWD_CONFIGS, run, _FWD_CONFIGS[0])
    run(cfg)
    return y, mean, rstd


@register("group_norm_silu_bwd", "triton", supports=norm_supports)
def group_norm_silu_bwd(grad_y, x, mean, rstd, num_groups, weight, bias, scale, shift,
                        activation, needs):
    G = int(num_groups)
    N, C, S, cl = geometry(x)
    gy = like_layout(grad_y, x)
    need_x = bool(needs[0])
    need_w, need_b, need_sc, need_sh = (bool(nd) and p is not None for nd, p in
                                        zip(needs[1:], (weight, bias, scale, shift)))
    sdt = stats_dtype(x)
    cdt = compute_dtype(x)
    act = ACTIVATION_CODES[activation]
    dev = x.device
    mean = mean.contiguous()
    rstd = rstd.contiguous()
    gx = torch.empty_like(x) if need_x else None
    nc = lambda flag: torch.empty((N, C), dtype=sdt, device=dev) if flag else None  # noqa: E731
    gsh, gsc, gw_n, gb_n = nc(need_sh), nc(need_sc), nc(need_w), nc(need_b)
    d = mean
    opt = lambda t: t if t is not None else d  # noqa: E731
    sms = cm.sm_count(dev)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_SC=scale is not None,
                 HAS_SH=shift is not None, ACT=act)
    needf = dict(NEED_W=need_w, NEED_B=need_b, NEED_SC=need_sc, NEED_SH=need_sh)

    def run(cfg):
        p = make_plan(N, C, S, G, cl, sms, cfg)
        if p.mode == "fused":
            _gn_bwd_fused_kernel[(N * p.GBLK,)](
                gy, x, opt(gx), mean, rstd, opt(weight), opt(bias), opt(scale), opt(shift),
                opt(gsh), opt(gsc), opt(gw_n), opt(gb_n), C, S, G, C // G, p.GBLK,
                CDT=cdt, GB=p.GB, CB=p.CB, BS=p.BS, CL=cl, NEED_X=need_x, **flags, **needf,
                num_warps=p.num_warps)
            return
        part = torch.empty((2, N, p.SPLIT, C), dtype=sdt, device=dev)
        c12 = torch.empty((N, G, 2), dtype=sdt, device=dev)
        grid = (N * p.GBLK * p.SPLIT,)
        _gn_bwd_reduce_kernel[grid](
            gy, x, mean, rstd, opt(weight), opt(bias), opt(scale), opt(shift), part,
            C, S, G, C // G, p.GBLK, p.SPLIT, p.CHUNK, N * p.SPLIT * C, CDT=cdt, GB=p.GB,
            CB=p.CB, NCB=p.NCB, BS=p.BS, CL=cl, **flags, num_warps=p.num_warps)
        fin_warps = _finalize_warps(p.GB * p.CB)
        _gn_bwd_finalize_kernel[(N * p.GBLK,)](
            part, opt(weight), opt(bias), opt(scale), c12, opt(gsh), opt(gsc), opt(gw_n),
            opt(gb_n), C, G, C // G, p.GBLK, p.SPLIT, N * p.SPLIT * C, CDT=cdt, GB=p.GB,
            CB=p.CB, NCB=p.NCB, HAS_W=flags["HAS_W"], HAS_B=flags["HAS_B"],
            HAS_SC=flags["HAS_SC"], **needf,
            SB=_split_block(p.SPLIT, p.GB * p.CB, fin_warps, 16), num_warps=fin_warps)
        if need_x:
            _gn_bwd_dx_kernel[grid](
                gy, x, gx, mean, rstd, opt(weight), opt(bias), opt(scale), opt(shift), c12,
                C, S, G, C // G, p.GBLK, p.SPLIT, p.CHUNK, CDT=cdt, GB=p.GB, CB=p.CB,
                NCB=p.NCB, BS=p.BS, CL=cl, **flags, num_warps=p.num_warps)

    key = _tune_key(x, G, (act, weight is not None, scale is not None, need_x))
    cfg = cm.pick_config("group_norm_bwd", key, dev, _BWD_CONFIGS, run, _BWD_CONFIGS[0])
    run(cfg)
    gw = gw_n.sum(0).to(weight.dtype) if need_w else None
    gb = gb_n.sum(0).to(bias.dtype) if need_b else None
    return (gx, gw, gb, gsc.to(scale.dtype) if need_sc else None,
            gsh.to(shift.dtype) if need_sh else None)
