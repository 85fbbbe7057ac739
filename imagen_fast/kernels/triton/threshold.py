"""Dynamic thresholding (exact per-sample percentile) and the fused sampler step.

Percentile by radix selection, not a sort. For a non-negative float the IEEE bit
pattern orders like an unsigned integer, so the k-th smallest |x| is found digit by
digit from the top bits of key = bits(|x|):

* level i: every program histograms (tl.histogram, then one atomic add per non-empty
  bin) the digit (key >> shift_i) & (2^nbits_i - 1) of the elements whose higher
  bits equal the prefix chosen so far; the prefix of level i is recomputed by each
  program from the already complete histograms of levels < i (cumulative sums of a
  few hundred counters), so a level costs one launch and one read of the data.
* the last level also keeps, per sample, the smallest key whose prefix is above the
  final prefix (atomic max of KEYMAX - key), which is the (k+1)-th order statistic
  when it is not in the final prefix's own bins.
* a finalize kernel (one program per sample) replays all levels and writes
  s = lerp(v_k, v_{k+1}, frac) with k = floor(p (n - 1)) computed in float64 on
  the host, as torch.quantile's linear interpolation, then s = max(s, min_value).

Keys are float32 bit patterns (float64 patterns for float64). A bfloat16/float16
input converted to float32 has 16/13 always-zero low bits, which are not visited:
bfloat16 needs 2 levels of 8 bits, float16 2 of 9, float32 4 of 8 (7 for the last).

Passes over memory. dynamic_threshold: L histogram reads + one read/write of the
output. sampler_step "dynamic": the first histogram pass also computes the guided
x0 (float32) from z_t, pred_cond, pred_uncond and writes it once; the other levels
read that x0; the output pass reads x0, z_t and the noise and writes z_s.
"static"/"none": one pass.

Samples are contiguous blocks of memory in both layouts this backend accepts
(contiguous and channels-last), so every kernel works on flat per-sample storage
and the output keeps the input's strides.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..layout import is_channels_last, like_layout
from ..registry import register
from . import _common as cm

# Test hook: {"block": elements per tile, "programs": programs per sample}.
_FORCED: dict = {}


def force_launch(**fields):
    return cm.forced(_FORCED, **fields)


# --------------------------------------------------------------------- kernels
@triton.jit
def _keys(v, F64: tl.constexpr):
    if F64:
        return v.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    else:
        return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _select_bin(h, k, NB: tl.constexpr):
    """(bin holding rank k, rank of k inside that bin) for a histogram h."""
    idx = tl.arange(0, NB)
    cum = tl.cumsum(h, 0)
    b = tl.sum((cum <= k).to(tl.int32), 0)
    return b, k - tl.sum(tl.where(idx < b, h, 0), 0)


@triton.jit
def _replay(hist_ptr, n, k, NLEV: tl.constexpr, L: tl.constexpr, NB: tl.constexpr,
            DB: tl.constexpr, F64: tl.constexpr):
    """Prefix (bits above level NLEV) of the k-th smallest key, and k's rank below it."""
    if F64:
        prefix = tl.zeros([], tl.int64)
    else:
        prefix = tl.zeros([], tl.int32)
    idx = tl.arange(0, NB)
    for j in tl.static_range(NLEV):
        h = tl.load(hist_ptr + (n * L + j) * NB + idx)
        b, k = _select_bin(h, k, NB)
        prefix = (prefix << DB) | b.to(prefix.dtype)
    return prefix, k


@triton.jit
def _guided_x0(z_ptr, pc_ptr, pu_ptr, coef_ptr, w, n, offs, m, CDT: tl.constexpr,
               HAS_UNCOND: tl.constexpr):
    z = tl.load(z_ptr + offs, mask=m, other=0.0).to(CDT)
    pred = tl.load(pc_ptr + offs, mask=m, other=0.0).to(CDT)
    if HAS_UNCOND:
        pu = tl.load(pu_ptr + offs, mask=m, other=0.0).to(CDT)
        pred = pu + w * (pred - pu)
    a = tl.load(coef_ptr + n * 5).to(CDT)
    b = tl.load(coef_ptr + n * 5 + 1).to(CDT)
    return a * z + b * pred, z


@triton.jit
def _hist_kernel(src_ptr, hist_ptr, minab_ptr, M, CHUNK, lo,
                 z_ptr, pc_ptr, pu_ptr, coef_ptr, par_ptr, w,
                 LEVEL: tl.constexpr, L: tl.constexpr, NB: tl.constexpr, DB: tl.constexpr,
                 SHIFT: tl.constexpr, NBITS: tl.constexpr, PREV_SHIFT: tl.constexpr,
                 BLOCK: tl.constexpr, F64: tl.constexpr, CDT: tl.constexpr,
                 FUSED_X0: tl.constexpr, HAS_UNCOND: tl.constexpr, PAR_F64: tl.constexpr):
    """Histogram of one radix level. FUSED_X0: compute x0 = a z + b pred and store it
    to src (the sampler's scratch) on the way."""
    pid = tl.program_id(0)
    n = tl.program_id(1)
    base = n.to(tl.int64) * M
    # (no `_` here: the loop below unpacks into its own names, and a name assigned both
    # before and inside a loop is loop-carried, so it must keep one type on the GPU)
    prefix, _k_below = _replay(hist_ptr, n, lo, LEVEL, L, NB, DB, F64)
    if PAR_F64:
        w = tl.load(par_ptr + 2)
    start = pid * CHUNK
    end = tl.minimum(start + CHUNK, M)
    h = tl.zeros([NB], tl.int32)
    if F64:
        keymax = 0x7FFFFFFFFFFFFFFF
    else:
        keymax = 0x7FFFFFFF
    best = tl.zeros([], tl.int64)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        inb = offs < end
        if FUSED_X0:
            v, _z = _guided_x0(z_ptr + base, pc_ptr + base, pu_ptr + base, coef_ptr, w, n,
                               offs, inb, CDT, HAS_UNCOND)
            tl.store(src_ptr + base + offs, v.to(src_ptr.dtype.element_ty), mask=inb)
        else:
            v = tl.load(src_ptr + base + offs, mask=inb, other=0.0).to(CDT)
        key = _keys(v, F64)
        if LEVEL == 0:
            match = inb
        else:
            match = inb & ((key >> PREV_SHIFT) == prefix)
        digit = ((key >> SHIFT) & ((1 << NBITS) - 1)).to(tl.int32)
        h += tl.histogram(digit, NB, mask=match)
        if LEVEL == L - 1:
            above = inb & ((key >> PREV_SHIFT) > prefix)
            cand = tl.where(above, (keymax - key).to(tl.int64), 0)
            best = tl.maximum(best, tl.max(cand, 0))
    tl.atomic_add(hist_ptr + (n * L + LEVEL) * NB + tl.arange(0, NB), h, mask=h > 0)
    if LEVEL == L - 1:
        tl.atomic_max(minab_ptr + n, best, mask=best > 0)


@triton.jit
def _finalize_kernel(hist_ptr, minab_ptr, s_ptr, lo, frac, minv, maxv, par_ptr,
                     L: tl.constexpr, NB: tl.constexpr, DB: tl.constexpr,
                     LASTBITS: tl.constexpr, LOW: tl.constexpr, F64: tl.constexpr,
                     PAR_F64: tl.constexpr):
    """s[n] = min(max(lerp(v_lo, v_lo+1, frac), min_value), max_value)."""
    n = tl.program_id(0)
    prefix, k = _replay(hist_ptr, n, lo, L - 1, L, NB, DB, F64)
    idx = tl.arange(0, NB)
    h = tl.load(hist_ptr + (n * L + L - 1) * NB + idx)
    b, k = _select_bin(h, k, NB)
    cnt = tl.sum(tl.where(idx == b, h, 0), 0)
    nxt = tl.min(tl.where((idx > b) & (h > 0), idx, NB), 0)
    top = prefix << LASTBITS
    lo_key = (top | b.to(top.dtype)) << LOW
    hi_key = tl.where(k + 1 < cnt, lo_key, (top | nxt.to(top.dtype)) << LOW)
    best = tl.load(minab_ptr + n)
    if F64:
        keymax = 0x7FFFFFFFFFFFFFFF
        above = (keymax - best).to(tl.int64)
        ft = tl.float64
    else:
        keymax = 0x7FFFFFFF
        above = (keymax - best).to(tl.int32)
        ft = tl.float32
    # nothing in the final prefix above lo: the next key is the smallest above it
    # (or there is none, which only happens for the last rank, where frac == 0)
    hi_key = tl.where((k + 1 >= cnt) & (nxt >= NB), tl.where(best > 0, above, lo_key), hi_key)
    v_lo = lo_key.to(ft, bitcast=True)
    v_hi = hi_key.to(ft, bitcast=True)
    if PAR_F64:
        frac = tl.load(par_ptr)
        minv = tl.load(par_ptr + 1)
        maxv = tl.load(par_ptr + 3)
    s = v_lo + (v_hi - v_lo) * frac
    s = tl.maximum(s, minv)
    s = tl.where(s > maxv, maxv, s)
    tl.store(s_ptr + n, s.to(s_ptr.dtype.element_ty))


@triton.jit
def _div(a, b):
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _clip_div(x, s):
    return _div(tl.minimum(tl.maximum(x, -s), s), s)


@triton.jit
def _threshold_apply_kernel(x_ptr, y_ptr, s_ptr, M, BLOCK: tl.constexpr, CDT: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1)
    base = n.to(tl.int64) * M
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < M
    s = tl.load(s_ptr + n).to(CDT)
    x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(CDT)
    tl.store(y_ptr + base + offs, _clip_div(x, s).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sampler_out_kernel(x0_ptr, z_ptr, pc_ptr, pu_ptr, noise_ptr, out_ptr, coef_ptr, s_ptr,
                        par_ptr, w, M, BLOCK: tl.constexpr, CDT: tl.constexpr,
                        THR: tl.constexpr, HAS_UNCOND: tl.constexpr,
                        HAS_NOISE: tl.constexpr, PAR_F64: tl.constexpr):
    """z_s = c_x0 * thr(x0) + c_z * z_t + c_noise * noise.
    THR 0: none, 1: static clamp to [-1, 1] (x0 computed here); 2: dynamic (x0 read
    from the scratch the histogram pass wrote, s from the finalize kernel)."""
    pid = tl.program_id(0)
    n = tl.program_id(1)
    base = n.to(tl.int64) * M
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < M
    if PAR_F64:
        w = tl.load(par_ptr + 2)
    if THR == 2:
        x0 = tl.load(x0_ptr + base + offs, mask=m, other=0.0).to(CDT)
        z = tl.load(z_ptr + base + offs, mask=m, other=0.0).to(CDT)
        x0 = _clip_div(x0, tl.load(s_ptr + n).to(CDT))
    else:
        x0, z = _guided_x0(z_ptr + base, pc_ptr + base, pu_ptr + base, coef_ptr, w, n, offs,
                           m, CDT, HAS_UNCOND)
        if THR == 1:
            x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    c_x0 = tl.load(coef_ptr + n * 5 + 2).to(CDT)
    c_z = tl.load(coef_ptr + n * 5 + 3).to(CDT)
    out = c_x0 * x0 + c_z * z
    if HAS_NOISE:
        c_n = tl.load(coef_ptr + n * 5 + 4).to(CDT)
        out += c_n * tl.load(noise_ptr + base + offs, mask=m, other=0.0).to(CDT)
    tl.store(out_ptr + base + offs, out.to(out_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------- launch
def _radix_plan(key_dtype: torch.dtype):
    """(key bits, lowest bit used, digit bits) for keys made from this dtype."""
    if key_dtype == torch.float64:
        return 63, 0, 11
    if key_dtype == torch.bfloat16:
        return 31, 16, 8
    if key_dtype == torch.float16:
        return 31, 13, 9
    return 31, 0, 8


def _levels(keybits: int, low: int, db: int):
    out, s = [], keybits
    while s > low:
        ns = max(low, s - db)
        out.append((ns, s - ns, s))  # (shift, nbits, previous shift)
        s = ns
    return out


def _rank(percentile: float, m: int):
    rank = float(percentile) * (m - 1)          # float64, as reference.quantile_linear
    lo = int(math.floor(rank))
    lo = min(max(lo, 0), m - 1)
    return lo, rank - lo


def _launch_geometry(n: int, m: int, device):
    if cm.interpreting():
        block = min(1024, cm.next_pow2(m))
    else:
        block = 2048
    block = _FORCED.get("block", block)
    tiles = cm.cdiv(m, block)
    per_sample = max(1, cm.cdiv(4 * cm.sm_count(device), n))
    programs = max(1, min(tiles, _FORCED.get("programs", per_sample)))
    chunk = cm.cdiv(tiles, programs) * block
    return block, chunk, cm.cdiv(m, chunk)


def _percentile_scale(src, key_dtype, n, m, percentile, min_value, par=None, fused=None,
                      max_value=math.inf):
    """s (N,) for the samples of src (flat (N, m) storage). par: float64 scalars
    [frac, min_value, guidance, max_value] for float64 inputs; fused = (z_t, pred_cond,
    pred_uncond, coefs, w): the first level computes x0 from them and writes it to src."""
    dev = src.device
    f64 = key_dtype == torch.float64
    keybits, low, db = _radix_plan(key_dtype)
    levels = _levels(keybits, low, db)
    L = len(levels)
    nb = 1 << db
    lo, frac = _rank(percentile, m)
    ws = torch.zeros(n * L * nb // 2 + n, dtype=torch.int64, device=dev)
    hist = ws[: n * L * nb // 2].view(torch.int32)
    minab = ws[n * L * nb // 2:]
    cdt = tl.float64 if f64 else tl.float32
    block, chunk, programs = _launch_geometry(n, m, dev)
    if fused is not None:
        z, pc, pu, coefs, w = fused
    else:
        z = pc = coefs = src
        pu, w = None, 0.0
    par_t = par if par is not None else ws
    for level, (shift, nbits, prev) in enumerate(levels):
        fx = fused is not None and level == 0
        _hist_kernel[(programs, n)](
            src, hist, minab, m, chunk, lo, z, pc, pu if pu is not None else pc, coefs,
            par_t, float(w),
            LEVEL=level, L=L, NB=nb, DB=db, SHIFT=shift, NBITS=nbits, PREV_SHIFT=prev,
            BLOCK=block, F64=f64, CDT=cdt, FUSED_X0=fx, HAS_UNCOND=fx and pu is not None,
            PAR_F64=par is not None, num_warps=8 if block >= 2048 else 4)
    s = torch.empty((n,), dtype=torch.float64 if f64 else torch.float32, device=dev)
    _finalize_kernel[(n,)](hist, minab, s, lo, float(frac), float(min_value), float(max_value), par_t,
                           L=L, NB=nb, DB=db, LASTBITS=levels[-1][1], LOW=low, F64=f64,
                           PAR_F64=par is not None, num_warps=4)
    return s


def _params(x, values):
    """float64 scalars for float64 inputs travel in a tensor (kernel float args are
    float32); None otherwise."""
    if x.dtype != torch.float64:
        return None
    return cm.device_scalars(values, torch.float64, x.device)


def _dense_per_sample(x) -> bool:
    return x.is_contiguous() or is_channels_last(x)


def _supports_threshold(x0) -> Optional[str]:
    why = cm.check_device(x0)
    if why:
        return why
    if not cm.dtype_supported(x0.dtype):
        return f"dtype {x0.dtype} not supported"
    if x0.shape[0] and x0.numel() // x0.shape[0] >= 2 ** 31:
        return "more than 2^31 elements per sample"
    return None


def _like(t, x):
    """t with x's memory layout (the kernels index every tensor by x's flat offsets)."""
    if t is None or t.stride() == x.stride():
        return t
    return like_layout(t, x)


@register("dynamic_threshold", "triton", supports=_supports_threshold)
def dynamic_threshold(x0, percentile, min_value, max_value=math.inf):
    if not _dense_per_sample(x0):
        x0 = x0.contiguous()
    n = x0.shape[0]
    m = x0.numel() // n
    par = _params(x0, [_rank(percentile, m)[1], float(min_value), 0.0, float(max_value)])
    s = _percentile_scale(x0, x0.dtype, n, m, percentile, min_value, par=par,
                          max_value=max_value)
    y = torch.empty_like(x0)
    block = 2048 if not cm.interpreting() else min(1024, cm.next_pow2(m))
    _threshold_apply_kernel[(cm.cdiv(m, block), n)](
        x0, y, s, m, BLOCK=block, CDT=cm.compute_dtype(x0),
        num_warps=8 if block >= 2048 else 4)
    return y


def _supports_sampler(z_t, pred_cond, pred_uncond, noise) -> Optional[str]:
    return cm.check_device(z_t, pred_cond, pred_uncond, noise) or _supports_threshold(z_t)


@register("sampler_step", "triton", supports=_supports_sampler)
def sampler_step(z_t, pred_cond, pred_uncond, guidance_scale, coefs, noise, threshold,
                 percentile, min_value):
    if not _dense_per_sample(z_t):
        z_t = z_t.contiguous()
    pc, pu, nz = (_like(t, z_t) for t in (pred_cond, pred_uncond, noise))
    n = z_t.shape[0]
    m = z_t.numel() // n
    f64 = z_t.dtype == torch.float64
    cdt = tl.float64 if f64 else tl.float32
    coefs = coefs.to(device=z_t.device, dtype=torch.float64).contiguous()
    out = torch.empty_like(z_t)
    w = float(guidance_scale)
    par = _params(z_t, [_rank(percentile, m)[1], float(min_value), w, math.inf])
    thr = {"none": 0, "static": 1, "dynamic": 2}[threshold]
    x0 = s = out
    if thr == 2:
        x0 = torch.empty((n, m), dtype=torch.float64 if f64 else torch.float32,
                         device=z_t.device)
        s = _percentile_scale(x0, x0.dtype, n, m, percentile, min_value, par=par,
                              fused=(z_t, pc, pu, coefs, w))
    block = 2048 if not cm.interpreting() else min(1024, cm.next_pow2(m))
    _sampler_out_kernel[(cm.cdiv(m, block), n)](
        x0, z_t, pc, pu if pu is not None else pc, nz if nz is not None else z_t, out, coefs,
        s, par if par is not None else coefs, w, m, BLOCK=block, CDT=cdt, THR=thr,
        HAS_UNCOND=pu is not None, HAS_NOISE=nz is not None, PAR_F64=par is not None,
        num_warps=8 if block >= 2048 else 4)
    return out
