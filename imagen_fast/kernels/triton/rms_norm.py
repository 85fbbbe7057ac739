"""Channel RMS norm + FiLM + activation (silu / exact gelu / none), forward and backward.

    r_ns = 1 / max(sqrt(mean_c x_ncs^2), eps),  xh = x r,
    y = act(xh * w_c * (1 + scale_nc) + shift_nc)

x is (N, C, *spatial) seen as (N, C, S), contiguous (channel stride S) or
channels-last (channel stride 1); CL is a compile-time flag, as in group_norm.py.

Work decomposition. The statistic belongs to one (sample, position), so a program
owns one sample and a block of BS positions, with every channel: tiles are
(CB channels, BS positions), CB * BS ~ TILE elements, the unit-stride axis the long
one. When all C channels fit one tile (NCB == 1) x is read once; otherwise the
program walks its channel blocks twice (sum of squares, then y), the second time
from cache.

Backward, with dh = gy act'(h), a = w (1 + scale), g = dh a:
    gx = r (g - xh mean_c(g xh))   (r g where the RMS was clamped: r == 1 / eps)
    P1_nc = sum_s dh, P2_nc = sum_s dh xh
The kernel writes gx and per-(position block) partials of P1, P2; the host sums the
partials (N x blocks x C, small) into g_shift = P1, g_scale = w P2 and
g_weight = sum_n (1 + scale) P2.
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

# Test hook: force plan fields {"block_c": CB, "block_s": BS}; see force_plan().
_FORCED: Dict[str, int] = {}
# 8 elements of a tile per thread: at 4 warps and 4096-element tiles (32 a thread)
# ptxas spilled some flag/layout variants on sm_80, at 8 warps (16 a thread) some
# float32 ones on sm_90 (benchmarks/gpu_compile.py)
TILE = 2048
NUM_WARPS = 8


def force_plan(**fields):
    """Context manager for tests: override the tile shape."""
    return cm.forced(_FORCED, **fields)


@triton.jit
def _coefs(n, c, cmask, C, w_ptr, sc_ptr, sh_ptr, CDT: tl.constexpr, HAS_W: tl.constexpr,
           HAS_SC: tl.constexpr, HAS_SH: tl.constexpr):
    """a = w (1 + scale) and b = shift per channel of the tile (identity when absent)."""
    a = tl.full(c.shape, 1.0, CDT)
    if HAS_W:
        a = a * tl.load(w_ptr + c, mask=cmask, other=0.0).to(CDT)
    if HAS_SC:
        a = a * (1.0 + tl.load(sc_ptr + n * C + c, mask=cmask, other=0.0).to(CDT))
    if HAS_SH:
        b = tl.load(sh_ptr + n * C + c, mask=cmask, other=0.0).to(CDT)
    else:
        b = tl.zeros(c.shape, CDT)
    return a, b


@triton.jit
def _tile(ptr, base, c0, s, C, S, CB: tl.constexpr, CL: tl.constexpr, CDT: tl.constexpr):
    """(CB, BS) tile at channels c0.. and positions s: values, offsets, mask, channels."""
    c = c0 + tl.arange(0, CB)
    m = (c < C)[:, None] & (s < S)[None, :]
    if CL:
        offs = s[None, :] * C + c[:, None]
    else:
        offs = c[:, None] * S + s[None, :]
    return tl.load(ptr + base + offs, mask=m, other=0.0).to(CDT), offs, m, c


@triton.jit
def _rms_fwd_kernel(x_ptr, y_ptr, r_ptr, w_ptr, sc_ptr, sh_ptr, C, S, NSB, eps,
                    CDT: tl.constexpr, CB: tl.constexpr, BS: tl.constexpr, NCB: tl.constexpr,
                    CL: tl.constexpr, HAS_W: tl.constexpr, HAS_SC: tl.constexpr,
                    HAS_SH: tl.constexpr, ACT: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // NSB
    s = (pid % NSB) * BS + tl.arange(0, BS)
    base = n.to(tl.int64) * C * S
    ssq = tl.zeros([BS], CDT)
    for cb in range(NCB):
        x, offs, m, c = _tile(x_ptr, base, cb * CB, s, C, S, CB, CL, CDT)
        ssq += tl.sum(x * x, axis=0)
    rms = tl.sqrt(ssq / (C + tl.zeros([], CDT)))
    r = 1.0 / tl.maximum(rms, eps + tl.zeros([], CDT))
    tl.store(r_ptr + n * S + s, r, mask=s < S)
    for cb in range(NCB):
        # NCB == 1: the compiler keeps the tile of the first loop (same loads).
        x, offs, m, c = _tile(x_ptr, base, cb * CB, s, C, S, CB, CL, CDT)
        a, b = _coefs(n, c, c < C, C, w_ptr, sc_ptr, sh_ptr, CDT, HAS_W, HAS_SC, HAS_SH)
        h = x * r[None, :] * a[:, None] + b[:, None]
        tl.store(y_ptr + base + offs, activation(h, ACT).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rms_dh(x_ptr, gy_ptr, base, c0, s, r, n, C, S, w_ptr, sc_ptr, sh_ptr, CDT: tl.constexpr,
            CB: tl.constexpr, CL: tl.constexpr, HAS_W: tl.constexpr, HAS_SC: tl.constexpr,
            HAS_SH: tl.constexpr, ACT: tl.constexpr):
    x, offs, m, c = _tile(x_ptr, base, c0, s, C, S, CB, CL, CDT)
    gy = tl.load(gy_ptr + base + offs, mask=m, other=0.0).to(CDT)
    a, b = _coefs(n, c, c < C, C, w_ptr, sc_ptr, sh_ptr, CDT, HAS_W, HAS_SC, HAS_SH)
    xh = x * r[None, :]
    dh = tl.where(m, gy * activation_grad(xh * a[:, None] + b[:, None], ACT), 0.0)
    return xh, dh, a, offs, m, c


@triton.jit
def _rms_bwd_kernel(gy_ptr, x_ptr, r_ptr, gx_ptr, w_ptr, sc_ptr, sh_ptr, part_ptr, C, S, NSB,
                    PST, eps, CDT: tl.constexpr, CB: tl.constexpr, BS: tl.constexpr,
                    NCB: tl.constexpr, CL: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_SC: tl.constexpr, HAS_SH: tl.constexpr, ACT: tl.constexpr,
                    NEED_X: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // NSB
    sb = pid % NSB
    s = sb * BS + tl.arange(0, BS)
    base = n.to(tl.int64) * C * S
    r = tl.load(r_ptr + n * S + s, mask=s < S, other=0.0).to(CDT)
    proj = tl.zeros([BS], CDT)
    for cb in range(NCB):
        xh, dh, a, offs, m, c = _rms_dh(x_ptr, gy_ptr, base, cb * CB, s, r, n, C, S, w_ptr,
                                        sc_ptr, sh_ptr, CDT, CB, CL, HAS_W, HAS_SC, HAS_SH, ACT)
        proj += tl.sum(dh * a[:, None] * xh, axis=0)
        off = (n * NSB + sb) * C + c
        tl.store(part_ptr + off, tl.sum(dh, axis=1), mask=c < C)
        tl.store(part_ptr + PST + off, tl.sum(dh * xh, axis=1), mask=c < C)
    if NEED_X:
        one = tl.full([], 1.0, CDT)
        clamped = r >= one / (eps + tl.zeros([], CDT))
        proj = tl.where(clamped, 0.0, proj / (C + tl.zeros([], CDT)))
        for cb in range(NCB):
            xh, dh, a, offs, m, c = _rms_dh(x_ptr, gy_ptr, base, cb * CB, s, r, n, C, S, w_ptr,
                                            sc_ptr, sh_ptr, CDT, CB, CL, HAS_W, HAS_SC, HAS_SH,
                                            ACT)
            gx = (dh * a[:, None] - xh * proj[None, :]) * r[None, :]
            tl.store(gx_ptr + base + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)


def make_plan(C: int, S: int, channels_last: bool):
    """(CB, BS, NCB): the unit-stride axis gets the long side of a ~TILE-element tile."""
    c_p2, s_p2 = cm.next_pow2(C), cm.next_pow2(S)
    if channels_last:
        cb = min(c_p2, 256)
        bs = min(s_p2, max(1, TILE // cb))
    else:
        bs = min(s_p2, 256)
        cb = min(c_p2, max(1, TILE // bs))
    cb = _FORCED.get("block_c", cb)
    bs = _FORCED.get("block_s", bs)
    return cb, bs, cm.cdiv(C, cb)


def _flags(weight, scale, shift, activation):
    return dict(HAS_W=weight is not None, HAS_SC=scale is not None, HAS_SH=shift is not None,
                ACT=ACTIVATION_CODES[activation])


@register("channel_rms_norm_silu_fwd", "triton", supports=norm_supports)
def channel_rms_norm_silu_fwd(x, weight, eps, scale, shift, activation):
    N, C, S, cl = geometry(x)
    y = torch.empty_like(x)
    rstd = torch.empty((N, S), dtype=stats_dtype(x), device=x.device)
    cb, bs, ncb = make_plan(C, S, cl)
    nsb = cm.cdiv(S, bs)
    d = rstd  # stands in for absent optional pointers (never read)
    _rms_fwd_kernel[(N * nsb,)](
        x, y, rstd, weight if weight is not None else d, scale if scale is not None else d,
        shift if shift is not None else d, C, S, nsb, float(eps), CDT=compute_dtype(x), CB=cb, BS=bs,
        NCB=ncb, CL=cl, **_flags(weight, scale, shift, activation), num_warps=NUM_WARPS)
    return y, rstd


@register("channel_rms_norm_silu_bwd", "triton", supports=norm_supports)
def channel_rms_norm_silu_bwd(grad_y, x, rstd, weight, eps, scale, shift, activation, needs):
    N, C, S, cl = geometry(x)
    gy = like_layout(grad_y, x)
    sdt = stats_dtype(x)
    rstd = rstd.to(sdt).contiguous()
    need_x = bool(needs[0])
    gx = torch.empty_like(x) if need_x else None
    cb, bs, ncb = make_plan(C, S, cl)
    nsb = cm.cdiv(S, bs)
    part = torch.empty((2, N, nsb, C), dtype=sdt, device=x.device)
    opt = lambda t: t if t is not None else rstd  # noqa: E731
    _rms_bwd_kernel[(N * nsb,)](
        gy, x, rstd, opt(gx), opt(weight), opt(scale), opt(shift), part, C, S, nsb,
        N * nsb * C, float(eps), CDT=compute_dtype(x), CB=cb, BS=bs, NCB=ncb, CL=cl,
        **_flags(weight, scale, shift, activation), NEED_X=need_x, num_warps=NUM_WARPS)
    p1, p2 = part.sum(dim=2)                                  # (N, C) each
    gw = gs = gsh = None
    if needs[1] and weight is not None:
        film = 1 + scale.to(sdt) if scale is not None else torch.ones_like(p2)
        gw = (film * p2).sum(0).to(weight.dtype)
    if needs[2] and scale is not None:
        gs = (p2 * weight.to(sdt) if weight is not None else p2).to(scale.dtype)
    if needs[3] and shift is not None:
        gsh = p1.to(shift.dtype)
    return gx, gw, gs, gsh
