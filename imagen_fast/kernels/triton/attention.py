"""Flash attention with a key padding mask, forward and backward.

    out = softmax(q k^T * scale, keys with mask False removed) v

q (B, H, Lq, D), k/v (B, H, Lk, D), unit stride on D, every other stride free;
mask (B, Lk) bool, True = attend. D is padded to a power of two >= 16 inside the
kernels (masked loads), so any D <= 128 works (Imagen's 64, DeepFloyd's 40 ...).

Forward (one program per (query block, b, h)): online softmax in the log2 domain,
scores and statistics in float32 (float64 for float64 inputs), P cast to the input
dtype for the P V product as flash-attention does. No Lq x Lk matrix exists. With a
mask, a tiny kernel first lists per batch the key blocks holding at least one valid
key (in order); the main loop walks only that list, so blocks that are all padding
cost nothing and the loop body has no branch (it stays software-pipelined).

Saved for the backward: out and lse = logsumexp of the scaled scores (natural log,
float32). A batch whose mask is all False has no listed blocks: its rows output
zeros and get lse = -inf (the torch backend's convention too); the backward kernels
visit no block for them, so their gradients are zeros.

Backward (deterministic, no atomics): delta = rowsum(dO * O); one kernel per key
block accumulates dK, dV over the query blocks (a key block with no valid key
writes zeros and loops zero times); one kernel per query block accumulates dQ over
the listed key blocks.

TRITON_INTERPRET=1: the interpreter's bf16/fp16 tl.dot is wrong, so operands are
upcast to float32 there (only there).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..registry import register
from . import _common as cm

# Test hook: force block sizes, e.g. {"fwd": (16, 16), "bwd": (16, 16)}.
_FORCED: dict = {}


def force_blocks(fwd=None, bwd=None):
    return cm.forced(_FORCED, fwd=fwd, bwd=bwd)


@triton.jit
def _kv_blocks_kernel(mask_ptr, blocks_ptr, count_ptr, Lk, NBLK, BN: tl.constexpr,
                      CH: tl.constexpr):
    """blocks[b, :count[b]] = indices of the key blocks with a valid key, in order."""
    b = tl.program_id(0)
    total = 0
    for c0 in range(0, NBLK, CH):
        blk = c0 + tl.arange(0, CH)
        cols = blk[:, None] * BN + tl.arange(0, BN)[None, :]
        m = tl.load(mask_ptr + b.to(tl.int64) * Lk + cols, mask=cols < Lk, other=0)
        any_valid = (tl.max(m.to(tl.int32), axis=1) > 0) & (blk < NBLK)
        flag = any_valid.to(tl.int32)
        pos = total + tl.cumsum(flag, axis=0) - flag
        tl.store(blocks_ptr + b * NBLK + pos, blk, mask=any_valid)
        total += tl.sum(flag, axis=0)
    tl.store(count_ptr + b, total)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, mask_ptr, blocks_ptr, count_ptr,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                     H, Lq, Lk, NBLK, qk_scale, consts_ptr,
                     D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     HAS_MASK: tl.constexpr, CDT: tl.constexpr, UPCAST: tl.constexpr,
                     PREC: tl.constexpr, SC64: tl.constexpr):
    if SC64:  # float64: the scale in float64 (float kernel arguments are float32)
        qk_scale = tl.load(consts_ptr)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :],
                mask=(offs_m < Lq)[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BM], float("-inf"), CDT)
    l_i = tl.zeros([BM], CDT)
    acc = tl.zeros([BM, DP], CDT)
    if HAS_MASK:
        nb = tl.load(count_ptr + b)
    else:
        nb = tl.cdiv(Lk, BN)
    for i in range(nb):
        if HAS_MASK:
            kb = tl.load(blocks_ptr + b * NBLK + i)
        else:
            kb = i
        offs_n = kb * BN + tl.arange(0, BN)
        valid = offs_n < Lk
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None],
                     mask=valid[None, :] & dmask[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :],
                    mask=valid[:, None] & dmask[None, :], other=0.0)
        if HAS_MASK:
            km = tl.load(mask_ptr + b.to(tl.int64) * Lk + offs_n, mask=valid, other=0)
            valid = valid & (km != 0)
        s = _dot(q, kt, UPCAST, PREC).to(CDT) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PREC).to(CDT)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    safe_l = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(safe_l)) * 0.6931471805599453)
    o_base = o_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    tl.store(o_base + offs_m[:, None] * som + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(offs_m < Lq)[:, None] & dmask[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * Lq + offs_m, lse.to(lse_ptr.dtype.element_ty),
             mask=offs_m < Lq)


@triton.jit
def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, sob, soh, som, sdb, sdh, sdm, H, Lq,
                           D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                           CDT: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, DP)
    m = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(o_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som
                + offs_d[None, :], mask=m, other=0.0).to(CDT)
    do = tl.load(do_ptr + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdm
                 + offs_d[None, :], mask=m, other=0.0).to(CDT)
    tl.store(delta_ptr + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, axis=1), mask=offs_m < Lq)


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr,
                          dk_ptr, dv_ptr,
                          sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
                          sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                          H, Lq, Lk, qk_scale, scale, consts_ptr,
                          D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                          BN: tl.constexpr, HAS_MASK: tl.constexpr, CDT: tl.constexpr,
                          UPCAST: tl.constexpr, PREC: tl.constexpr, SC64: tl.constexpr):
    if SC64:
        qk_scale = tl.load(consts_ptr)
        scale = tl.load(consts_ptr + 1)
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    valid = offs_n < Lk
    kv_mask = valid[:, None] & dmask[None, :]
    k = tl.load(k_ptr + b64 * skb + h64 * skh + offs_n[:, None] * skn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b64 * svb + h64 * svh + offs_n[:, None] * svn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    if HAS_MASK:
        km = tl.load(mask_ptr + b64 * Lk + offs_n, mask=valid, other=0)
        valid = valid & (km != 0)
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    num_m = tl.where(n_valid > 0, tl.cdiv(Lq, BM), 0)  # an all-padding block: skip
    dk = tl.zeros([BN, DP], CDT)
    dv = tl.zeros([BN, DP], CDT)
    q_base = q_ptr + b64 * sqb + h64 * sqh
    do_base = do_ptr + b64 * sdb + h64 * sdh
    for mb in range(num_m):
        offs_m = mb * BM + tl.arange(0, BM)
        row_ok = offs_m < Lq
        qm = row_ok[:, None] & dmask[None, :]
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=qm, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdm + offs_d[None, :], mask=qm, other=0.0)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0).to(CDT)
        delta = tl.load(delta_ptr + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
        st = _dot(k, tl.trans(q), UPCAST, PREC).to(CDT) * qk_scale        # [BN, BM], log2
        pt = tl.exp2(st - (lse * 1.4426950408889634)[None, :])
        pt = tl.where(valid[:, None] & row_ok[None, :], pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, UPCAST, PREC).to(CDT)
        dpt = _dot(v, tl.trans(do), UPCAST, PREC).to(CDT)                  # [BN, BM]
        dst = pt * (dpt - delta.to(CDT)[None, :])
        dk += _dot(dst.to(q.dtype), q, UPCAST, PREC).to(CDT)
    dk = dk * scale
    tl.store(dk_ptr + b64 * sdkb + h64 * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + b64 * sdvb + h64 * sdvh + offs_n[:, None] * sdvn + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr,
                        blocks_ptr, count_ptr, dq_ptr,
                        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
                        sdqb, sdqh, sdqm, H, Lq, Lk, NBLK, qk_scale, scale, consts_ptr,
                        D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, HAS_MASK: tl.constexpr, CDT: tl.constexpr,
                        UPCAST: tl.constexpr, PREC: tl.constexpr, SC64: tl.constexpr):
    if SC64:
        qk_scale = tl.load(consts_ptr)
        scale = tl.load(consts_ptr + 1)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    row_ok = offs_m < Lq
    qm = row_ok[:, None] & dmask[None, :]
    q = tl.load(q_ptr + b64 * sqb + h64 * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=qm, other=0.0)
    do = tl.load(do_ptr + b64 * sdb + h64 * sdh + offs_m[:, None] * sdm + offs_d[None, :],
                 mask=qm, other=0.0)
    lse2 = tl.load(lse_ptr + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0).to(CDT) \
        * 1.4426950408889634
    delta = tl.load(delta_ptr + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0).to(CDT)
    dq = tl.zeros([BM, DP], CDT)
    k_base = k_ptr + b64 * skb + h64 * skh
    v_base = v_ptr + b64 * svb + h64 * svh
    if HAS_MASK:
        nb = tl.load(count_ptr + b)
    else:
        nb = tl.cdiv(Lk, BN)
    for i in range(nb):
        if HAS_MASK:
            kb = tl.load(blocks_ptr + b * NBLK + i)
        else:
            kb = i
        offs_n = kb * BN + tl.arange(0, BN)
        valid = offs_n < Lk
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None],
                     mask=valid[None, :] & dmask[:, None], other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * svn + offs_d[:, None],
                     mask=valid[None, :] & dmask[:, None], other=0.0)
        if HAS_MASK:
            km = tl.load(mask_ptr + b64 * Lk + offs_n, mask=valid, other=0)
            valid = valid & (km != 0)
        s = _dot(q, kt, UPCAST, PREC).to(CDT) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(valid[None, :] & row_ok[:, None], p, 0.0)
        dp = _dot(do, vt, UPCAST, PREC).to(CDT)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), UPCAST, PREC).to(CDT)
    dq = dq * scale
    tl.store(dq_ptr + b64 * sdqb + h64 * sdqh + offs_m[:, None] * sdqm + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=qm)


# ------------------------------------------------------------------------ launch
# (BM, BN, num_warps, num_stages) candidates for the autotuner (GPU only); the first of
# each list is the default, what runs untuned. Every list is compiled for sm_80 and
# sm_90 by benchmarks/gpu_compile.py (tests/ops/test_gpu_compile.py in CI): every entry
# compiles and fits the card's shared memory, and the defaults do not spill registers.
#
# float16/bfloat16 run tl.dot on tensor cores; per padded head dim:
_FWD_16 = [(64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2),
           (64, 128, 4, 2), (128, 32, 4, 3), (64, 32, 4, 3), (32, 32, 4, 1)]
_BWD_16 = [(64, 32, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 64, 8, 2),
           (32, 128, 8, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 32, 4, 1)]
# float32 (and float64) dots are exact ("ieee"): FMA, with both operand tiles and the
# accumulator in registers, so the tiles that fit depend on the bytes of a row (element
# size x padded head dim). Keyed by the largest row size each list serves:
_FWD_IEEE = {
    64: [(64, 32, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2),
         (32, 32, 4, 2)],
    128: [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2), (32, 32, 8, 2)],
    # (64, 32, 8, 2) spilled 4 B on sm_80 at head dim 48 with a mask
    256: [(32, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1)],
    512: [(64, 16, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2), (16, 32, 8, 2)],
    1024: [(16, 16, 4, 1), (16, 32, 8, 2), (32, 16, 8, 2)],
}
_BWD_IEEE = {
    64: [(32, 32, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1)],
    128: [(32, 32, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 1)],
    256: [(32, 32, 8, 2), (32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)],
    512: [(16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 4, 2), (16, 32, 4, 2)],
    1024: [(16, 16, 4, 1), (16, 16, 8, 2)],
}


def _configs(kind: str, dtype: torch.dtype, dp: int):
    """The autotuner's candidates for this dtype and padded head dim; [0] is the default."""
    if dtype in (torch.float16, torch.bfloat16):
        return _FWD_16 if kind == "fwd" else _BWD_16
    table = _FWD_IEEE if kind == "fwd" else _BWD_IEEE
    row_bytes = torch.finfo(dtype).bits // 8 * dp
    return table[min(k for k in table if k >= row_bytes)]


_INTERP_BLOCKS = (32, 32)


def _supports(q, k, v, mask) -> Optional[str]:
    why = cm.check_device(q, k, v, mask)
    if why:
        return why
    if not cm.dtype_supported(q.dtype):
        return f"dtype {q.dtype} not supported"
    if q.shape[-1] > 128:
        return f"head dim {q.shape[-1]} > 128"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "q, k, v need unit stride on the head dim"
    return None


def _prec(dt: torch.dtype) -> str:
    return "ieee" if dt in (torch.float32, torch.float64) else "tf32"


def _cdt(dt: torch.dtype):
    return tl.float64 if dt == torch.float64 else tl.float32


def _head_pad(d: int) -> int:
    return max(16, cm.next_pow2(d))


def _block_list(mask_u8: torch.Tensor, lk: int, bn: int):
    b = mask_u8.shape[0]
    nblk = cm.cdiv(lk, bn)
    blocks = torch.empty((b, nblk), dtype=torch.int32, device=mask_u8.device)
    count = torch.empty((b,), dtype=torch.int32, device=mask_u8.device)
    # [CH, BN] mask tiles of at most 2048 bytes: 16 a thread (wider tiles spilled)
    ch = min(64, cm.next_pow2(nblk), max(1, 2048 // bn))
    _kv_blocks_kernel[(b,)](mask_u8, blocks, count, lk, nblk, BN=bn, CH=ch, num_warps=4)
    return blocks, count, nblk


def _consts(q, scale):
    """float64 inputs: [scale * log2(e), scale] as a float64 tensor; else None."""
    if q.dtype != torch.float64:
        return None
    return cm.device_scalars([float(scale) * cm.LOG2E, float(scale)], torch.float64, q.device)


def _mask_u8(mask):
    return None if mask is None else mask.contiguous().view(torch.uint8)


def _tune_key(q, k, mask):
    return (q.dtype, _head_pad(q.shape[-1]), mask is not None, cm.bucket(q.shape[2]),
            cm.bucket(k.shape[2]))


@register("attention_fwd", "triton", supports=_supports)
def attention_fwd(q, k, v, mask, scale):
    return _forward(q, k, v, mask, scale, torch.float32)


def _forward(q, k, v, mask, scale, lse_dtype):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=lse_dtype, device=q.device)
    m8 = _mask_u8(mask)
    upcast = cm.interpreting() and q.dtype in (torch.float16, torch.bfloat16)
    lists = {}
    consts = _consts(q, scale)

    def run(cfg):
        bm, bn, nw, ns = cfg
        if m8 is not None:
            if bn not in lists:
                lists[bn] = _block_list(m8, Lk, bn)
            blocks, count, nblk = lists[bn]
        else:
            blocks = count = lse
            nblk = 0
        _attn_fwd_kernel[(cm.cdiv(Lq, bm), B * H)](
            q, k, v, out, lse, m8 if m8 is not None else lse, blocks, count,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            H, Lq, Lk, nblk, float(scale) * cm.LOG2E, consts if consts is not None else lse,
            D=D, DP=_head_pad(D), BM=bm, BN=bn, HAS_MASK=m8 is not None, CDT=_cdt(q.dtype),
            UPCAST=upcast, PREC=_prec(q.dtype), SC64=consts is not None, num_warps=nw,
            num_stages=ns)

    if "fwd" in _FORCED:
        cfg = tuple(_FORCED["fwd"]) + (4, 2)
    elif cm.interpreting():
        cfg = _INTERP_BLOCKS + (4, 1)
    else:
        cands = _configs("fwd", q.dtype, _head_pad(D))
        cfg = cm.pick_config("attention_fwd", _tune_key(q, k, mask), q.device, cands, run,
                             cands[0])
    run(cfg)
    return out, lse


@register("attention_bwd", "triton", supports=_supports)
def attention_bwd(grad_out, q, k, v, mask, out, lse, scale):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    do = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    o = out if out.stride(-1) == 1 else out.contiguous()
    if q.dtype == torch.float64:
        # The saved lse is float32 by contract; float64 gradients need it exact.
        _, lse = _forward(q, k, v, mask, scale, torch.float64)
    lse = lse.contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if dq.stride(-1) != 1:
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    m8 = _mask_u8(mask)
    cdt = _cdt(q.dtype)
    upcast = cm.interpreting() and q.dtype in (torch.float16, torch.bfloat16)
    dp_ = _head_pad(D)
    delta = torch.empty((B, H, Lq), dtype=torch.float64 if q.dtype == torch.float64
                        else torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(cm.cdiv(Lq, 64), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1),
        do.stride(2), H, Lq, D=D, DP=dp_, BM=64, CDT=cdt, num_warps=4)
    lists = {}
    qk_scale = float(scale) * cm.LOG2E
    consts = _consts(q, scale)
    cptr = consts if consts is not None else delta

    def run(cfg):
        bm, bn, nw, ns = cfg
        common = dict(D=D, DP=dp_, BM=bm, BN=bn, HAS_MASK=m8 is not None, CDT=cdt,
                      UPCAST=upcast, PREC=_prec(q.dtype), SC64=consts is not None,
                      num_warps=nw, num_stages=ns)
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1),
                   do.stride(2))
        mptr = m8 if m8 is not None else lse
        _attn_bwd_dkdv_kernel[(cm.cdiv(Lk, bn), B * H)](
            q, k, v, do, lse, delta, mptr, dk, dv, *strides,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            H, Lq, Lk, qk_scale, float(scale), cptr, **common)
        if m8 is not None:
            if bn not in lists:
                lists[bn] = _block_list(m8, Lk, bn)
            blocks, count, nblk = lists[bn]
        else:
            blocks = count = lse
            nblk = 0
        _attn_bwd_dq_kernel[(cm.cdiv(Lq, bm), B * H)](
            q, k, v, do, lse, delta, mptr, blocks, count, dq, *strides,
            dq.stride(0), dq.stride(1), dq.stride(2), H, Lq, Lk, nblk, qk_scale, float(scale),
            cptr, **common)

    if "bwd" in _FORCED:
        cfg = tuple(_FORCED["bwd"]) + (4, 2)
    elif cm.interpreting():
        cfg = _INTERP_BLOCKS + (4, 1)
    else:
        cands = _configs("bwd", q.dtype, dp_)
        cfg = cm.pick_config("attention_bwd", _tune_key(q, k, mask), q.device, cands, run,
                             cands[0])
    run(cfg)
    return dq, dk, dv
