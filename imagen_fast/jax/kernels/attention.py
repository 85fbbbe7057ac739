"""Flash attention with a key padding mask as Pallas kernels, forward and backward
(``jax.custom_vjp``).

q (B, H, Lq, D), k and v (B, H, Lk, D), key mask (B, Lk). The grid walks
(batch, head, query block, key block) with the key axis innermost and sequential;
the running max m, normaliser l and output accumulator live in VMEM scratch
(online softmax: no Lq x Lk matrix in memory). m and l are kept 128 lanes wide,
every lane equal, so they broadcast against (block_q, block_k) tiles with a tile
instead of a lane-to-sublane relayout.

TPU tiling: block_k is a multiple of 128 (key positions are the lanes of the score
tile), block_q a multiple of 8, head dims above 128 a multiple of 128. Sequences are
padded up to whole blocks here (text lengths like 77 become 128) and padded keys are
masked; padded queries are sliced off. A query whose keys are all masked has l = 0:
its output is 0 and its log-sum-exp -inf (``imagen_fast.core.MASKED_ROW_LSE``, the
torch backends' convention too); the backward gives its keys zero weight, no NaN.

Backward: two kernels as in FlashAttention-2, dq over key blocks, dk and dv over
query blocks, each recomputing p = exp(s - lse) from the saved log-sum-exp; the
row term delta = rowsum(dO * O) is recomputed per tile.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ...core import MASKED_ROW_LSE
from ._common import LANES, SUBLANES, round_up

_NT = (((1,), (1,)), ((), ()))      # a @ b.T
_TN = (((0,), (0,)), ((), ()))      # a.T @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_q: int = 128
    block_k: int = 128

    def __post_init__(self):
        if self.block_q <= 0 or self.block_q % SUBLANES:
            raise ValueError(f"block_q must be a positive multiple of {SUBLANES}, got {self.block_q}")
        if self.block_k <= 0 or self.block_k % LANES:
            raise ValueError(f"block_k must be a positive multiple of {LANES}, got {self.block_k}")


def _lanes(t, width: int):
    """A (rows, 128) lane-replicated value as (rows, width)."""
    if width % LANES == 0:
        return jnp.tile(t, (1, width // LANES))
    return t[:, :width]          # width < 128 (wider dims are padded to 128s)


def _scores(q_ref, k_ref, mask_ref, scale):
    s = jax.lax.dot_general(q_ref[0, 0], k_ref[0, 0], _NT,
                            preferred_element_type=jnp.float32) * scale
    keep = None if mask_ref is None else mask_ref[0] != 0          # (1, block_k)
    return s, keep


# ------------------------------------------------------------------------ forward
def _fwd_kernel(*refs, scale, has_mask, save_lse):
    q_ref, k_ref, v_ref = refs[:3]
    mask_ref = refs[3] if has_mask else None
    rest = refs[4 if has_mask else 3:]
    o_ref, lse_ref = (rest[0], rest[1]) if save_lse else (rest[0], None)
    m_scr, l_scr, acc_scr = rest[-3:]
    kv = pl.program_id(3)

    @pl.when(kv == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    s, keep = _scores(q_ref, k_ref, mask_ref, scale)
    if keep is not None:
        s = jnp.where(keep, s, -jnp.inf)
    block_k = s.shape[1]
    m_prev, l_prev = m_scr[...], l_scr[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)            # no key seen yet
    p = jnp.exp(s - _lanes(m_safe, block_k))
    alpha = jnp.exp(m_prev - m_safe)
    l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_next
    v = v_ref[0, 0]
    head_dim = acc_scr.shape[1]
    acc_scr[...] = acc_scr[...] * _lanes(alpha, head_dim) + jnp.dot(
        p.astype(v.dtype), v, preferred_element_type=jnp.float32)

    @pl.when(kv == pl.num_programs(3) - 1)
    def _store():
        l = l_scr[...]
        inv = jnp.where(l == 0.0, 0.0, 1.0 / jnp.where(l == 0.0, 1.0, l))
        o_ref[0, 0] = (acc_scr[...] * _lanes(inv, head_dim)).astype(o_ref.dtype)
        if lse_ref is not None:
            lse = m_scr[...] + jnp.log(jnp.where(l == 0.0, 1.0, l))
            lse_ref[0, 0] = jnp.where(l == 0.0, MASKED_ROW_LSE, lse)


# ----------------------------------------------------------------------- backward
def _probs(q_ref, k_ref, mask_ref, lse_ref, scale):
    s, keep = _scores(q_ref, k_ref, mask_ref, scale)
    lse = lse_ref[0, 0]
    lse = jnp.where(lse == MASKED_ROW_LSE, 0.0, lse)           # a fully masked row: keep drops it
    p = jnp.exp(s - _lanes(lse, s.shape[1]))
    return p if keep is None else jnp.where(keep, p, 0.0)


def _ds(p, v_ref, o_ref, do_ref):
    do = do_ref[0, 0]
    dp = jax.lax.dot_general(do, v_ref[0, 0], _NT, preferred_element_type=jnp.float32)
    delta = jnp.sum(do.astype(jnp.float32) * o_ref[0, 0].astype(jnp.float32), axis=1,
                    keepdims=True)
    return p * (dp - delta)


def _dq_kernel(*refs, scale, has_mask):
    q_ref, k_ref, v_ref = refs[:3]
    mask_ref = refs[3] if has_mask else None
    o_ref, do_ref, lse_ref, dq_ref, dq_scr = refs[4 if has_mask else 3:]
    kv = pl.program_id(3)

    @pl.when(kv == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    p = _probs(q_ref, k_ref, mask_ref, lse_ref, scale)
    ds = _ds(p, v_ref, o_ref, do_ref)
    k = k_ref[0, 0]
    dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(kv == pl.num_programs(3) - 1)
    def _store():
        dq_ref[0, 0] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, scale, has_mask):
    q_ref, k_ref, v_ref = refs[:3]
    mask_ref = refs[3] if has_mask else None
    o_ref, do_ref, lse_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs[4 if has_mask else 3:]
    qi = pl.program_id(3)

    @pl.when(qi == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    p = _probs(q_ref, k_ref, mask_ref, lse_ref, scale)
    do = do_ref[0, 0]
    dv_scr[...] += jax.lax.dot_general(p.astype(do.dtype), do, _TN,
                                       preferred_element_type=jnp.float32)
    ds = _ds(p, v_ref, o_ref, do_ref)
    q = q_ref[0, 0]
    dk_scr[...] += jax.lax.dot_general(ds.astype(q.dtype), q, _TN,
                                       preferred_element_type=jnp.float32)

    @pl.when(qi == pl.num_programs(3) - 1)
    def _store():
        dk_ref[0, 0] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[0, 0] = dv_scr[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------------- launchers
def _specs(bq, bk, d, q_axis, k_axis):
    """BlockSpecs for q-side (bq rows), k-side (bk rows), the mask and lse, given
    which grid axes walk the query and key blocks."""
    def qmap(*g):
        return (g[0], g[1], g[q_axis], 0)

    def kmap(*g):
        return (g[0], g[1], g[k_axis], 0)

    def mmap(*g):
        return (g[0], 0, g[k_axis])

    return dict(q=pl.BlockSpec((1, 1, bq, d), qmap), k=pl.BlockSpec((1, 1, bk, d), kmap),
                mask=pl.BlockSpec((1, 1, bk), mmap), lse=pl.BlockSpec((1, 1, bq, LANES), qmap))


def _params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _forward(q, k, v, mask, scale, bq, bk, save_lse, interpret):
    b, h, lq, d = q.shape
    lk = k.shape[2]
    sp = _specs(bq, bk, d, 2, 3)
    has_mask = mask is not None
    in_specs = [sp["q"], sp["k"], sp["k"]] + ([sp["mask"]] if has_mask else [])
    out_specs = [sp["q"]]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if save_lse:
        out_specs.append(sp["lse"])
        out_shape.append(jax.ShapeDtypeStruct((b, h, lq, LANES), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, has_mask=has_mask, save_lse=save_lse),
        grid=(b, h, lq // bq, lk // bk), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=_params(), interpret=interpret,
    )(q, k, v, *([mask] if has_mask else []))
    return outs if save_lse else (outs[0], None)


def _backward(q, k, v, mask, o, lse, do, scale, bq, bk, interpret):
    b, h, lq, d = q.shape
    lk = k.shape[2]
    has_mask = mask is not None
    extra = [mask] if has_mask else []
    sp = _specs(bq, bk, d, 2, 3)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, has_mask=has_mask),
        grid=(b, h, lq // bq, lk // bk),
        in_specs=[sp["q"], sp["k"], sp["k"]] + ([sp["mask"]] if has_mask else [])
        + [sp["q"], sp["q"], sp["lse"]],
        out_specs=sp["q"], out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=_params(), interpret=interpret,
    )(q, k, v, *extra, o, do, lse)
    sp = _specs(bq, bk, d, 3, 2)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, has_mask=has_mask),
        grid=(b, h, lk // bk, lq // bq),
        in_specs=[sp["q"], sp["k"], sp["k"]] + ([sp["mask"]] if has_mask else [])
        + [sp["q"], sp["q"], sp["lse"]],
        out_specs=[sp["k"], sp["k"]],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        compiler_params=_params(), interpret=interpret,
    )(q, k, v, *extra, o, do, lse)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, mask, scale, bq, bk, interpret):
    return _forward(q, k, v, mask, scale, bq, bk, False, interpret)[0]


def _flash_fwd(q, k, v, mask, scale, bq, bk, interpret):
    o, lse = _forward(q, k, v, mask, scale, bq, bk, True, interpret)
    return o, (q, k, v, mask, o, lse)


def _flash_bwd(scale, bq, bk, interpret, res, do):
    q, k, v, mask, o, lse = res
    dq, dk, dv = _backward(q, k, v, mask, o, lse, do, scale, bq, bk, interpret)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_axis(t, axis: int, size: int):
    if t.shape[axis] == size:
        return t
    pad = [(0, 0)] * t.ndim
    pad[axis] = (0, size - t.shape[axis])
    return jnp.pad(t, pad)


def attention(q, k, v, key_padding_mask=None, scale: Optional[float] = None, *,
              block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
    """Flash attention of q (B, H, Lq, D) over k, v (B, H, Lk, D) with an optional
    (B, Lk) bool key mask (True = attend); arguments as ``imagen_fast.jax.ops.attention``
    (which checks them). Pads to whole blocks and slices the result back."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = float(d ** -0.5 if scale is None else scale)
    bq = min(block_sizes.block_q, round_up(lq, SUBLANES))
    bk = min(block_sizes.block_k, round_up(lk, LANES))
    lq_pad, lk_pad = round_up(lq, bq), round_up(lk, bk)
    d_pad = d if d <= LANES else round_up(d, LANES)
    q_p = _pad_axis(_pad_axis(q, 2, lq_pad), 3, d_pad)
    k_p = _pad_axis(_pad_axis(k, 2, lk_pad), 3, d_pad)
    v_p = _pad_axis(_pad_axis(v, 2, lk_pad), 3, d_pad)
    mask = None
    if key_padding_mask is not None or lk_pad != lk:
        keep = (jnp.ones((b, lk), jnp.int32) if key_padding_mask is None
                else key_padding_mask.astype(jnp.int32))
        mask = _pad_axis(keep, 1, lk_pad)[:, None, :]
    out = _flash(q_p, k_p, v_p, mask, scale, bq, bk, interpret)
    return out[:, :, :lq, :d]
