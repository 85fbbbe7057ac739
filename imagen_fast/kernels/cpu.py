"""Backend "cpu": the C++/OpenMP kernels of csrc/cpu, through imagen_fast._C.

Tensors cross as data pointers, sizes, a layout flag and a dtype code; outputs are
allocated here with torch and written completely by the kernels. The kernels run
with torch's thread count (torch.get_num_threads()) and release the GIL.

Attention on CPU runs torch's flash-attention CPU kernel
(aten._scaled_dot_product_flash_attention_for_cpu and its backward) with the key
padding mask as an additive 0 / -inf mask; batches whose keys are all masked get
zero output and zero gradients (the kernel itself would produce NaN there). Dtypes
that kernel does not take (float64) run the torch backend's maths, looked up in the
registry (imagen_fast.ops registers it when it loads, before any backend runs).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._compiled import load_extension
# The shared layout rules, under the names this module's kernel calls have always used.
from .layout import ACTIVATION_CODES as _ACTIVATION_CODES
from .layout import DTYPE_CODES as _DTYPE_CODES
from .layout import THRESHOLD_CODES as _THRESHOLD_CODES
from .layout import is_channels_last as _channels_last
from .layout import like_layout as _same_layout
from .layout import stats_dtype as _stat_dtype
from .registry import implementation, register

_C = load_extension()
if _C is None or not hasattr(_C, "group_norm_fwd") or not hasattr(_C, "channel_rms_norm_fwd"):
    raise ImportError("imagen_fast._C is not built (or was built without the CPU kernels)")


def _threads() -> int:
    return torch.get_num_threads()


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _layout_reason(t: torch.Tensor, name: str) -> Optional[str]:
    if t.device.type != "cpu":
        return f"{name} must be a CPU tensor, got {t.device.type}"
    if t.dtype not in _DTYPE_CODES:
        return f"{name} has dtype {t.dtype}; the cpu kernels take float32/float64/float16/bfloat16"
    if not (t.is_contiguous() or _channels_last(t)):
        return f"{name} must be contiguous or channels-last"
    return None


def _param(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype).contiguous()


# ----------------------------------------------------------------- group_norm_silu
def _gn_supports(x, *rest) -> Optional[str]:
    why = _layout_reason(x, "x")
    if why is None and x.ndim < 2:
        return "x must have at least 2 dims"
    return why


def _gn_geometry(x: torch.Tensor, num_groups: int):
    n, c = x.shape[:2]
    s = x.numel() // (n * c) if n * c else 0
    return n, c, s, num_groups, _channels_last(x)


@register("group_norm_silu_fwd", "cpu", supports=_gn_supports)
def group_norm_silu_fwd(x, num_groups, weight, bias, eps, scale, shift, activation):
    pdt = _stat_dtype(x)
    n, c, s, g, cl = _gn_geometry(x, num_groups)
    w, b, sc, sh = (_param(t, pdt) for t in (weight, bias, scale, shift))
    y = torch.empty_like(x)
    mean = torch.empty((n, g), dtype=pdt)
    rstd = torch.empty((n, g), dtype=pdt)
    _C.group_norm_fwd(x.data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), _ptr(w),
                      _ptr(b), _ptr(sc), _ptr(sh), n, c, s, g, float(eps), cl,
                      _DTYPE_CODES[x.dtype], _ACTIVATION_CODES[activation], _threads())
    return y, mean, rstd


@register("group_norm_silu_bwd", "cpu", supports=_gn_supports)
def group_norm_silu_bwd(grad_y, x, mean, rstd, num_groups, weight, bias, scale, shift,
                        activation, needs):
    pdt = _stat_dtype(x)
    n, c, s, g, cl = _gn_geometry(x, num_groups)
    grad_y = _same_layout(grad_y, x)
    mean = mean.to(pdt).contiguous()
    rstd = rstd.to(pdt).contiguous()
    w, b, sc, sh = (_param(t, pdt) for t in (weight, bias, scale, shift))
    need_x, need_w, need_b, need_s, need_sh = needs
    gx = torch.empty_like(x) if need_x else None
    gw = torch.empty(c, dtype=pdt) if need_w and w is not None else None
    gb = torch.empty(c, dtype=pdt) if need_b and b is not None else None
    gs = torch.empty((n, c), dtype=pdt) if need_s and sc is not None else None
    gsh = torch.empty((n, c), dtype=pdt) if need_sh and sh is not None else None
    _C.group_norm_bwd(grad_y.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                      _ptr(w), _ptr(b), _ptr(sc), _ptr(sh), _ptr(gx), _ptr(gw), _ptr(gb),
                      _ptr(gs), _ptr(gsh), n, c, s, g, cl, _DTYPE_CODES[x.dtype],
                      _ACTIVATION_CODES[activation], _threads())
    params = (weight, bias, scale, shift)
    grads = (gw, gb, gs, gsh)
    return (gx,) + tuple(None if gr is None else gr.to(p.dtype).reshape(p.shape)
                         for gr, p in zip(grads, params))


# ------------------------------------------------------------ channel_rms_norm_silu
@register("channel_rms_norm_silu_fwd", "cpu", supports=_gn_supports)
def channel_rms_norm_silu_fwd(x, weight, eps, scale, shift, activation):
    pdt = _stat_dtype(x)
    n, c, s, _, cl = _gn_geometry(x, 1)
    w, sc, sh = (_param(t, pdt) for t in (weight, scale, shift))
    y = torch.empty_like(x)
    rstd = torch.empty((n, s), dtype=pdt)
    _C.channel_rms_norm_fwd(x.data_ptr(), y.data_ptr(), rstd.data_ptr(), _ptr(w), _ptr(sc), _ptr(sh),
                            n, c, s, float(eps), cl, _DTYPE_CODES[x.dtype],
                            _ACTIVATION_CODES[activation], _threads())
    return y, rstd


@register("channel_rms_norm_silu_bwd", "cpu", supports=_gn_supports)
def channel_rms_norm_silu_bwd(grad_y, x, rstd, weight, eps, scale, shift, activation, needs):
    pdt = _stat_dtype(x)
    n, c, s, _, cl = _gn_geometry(x, 1)
    grad_y = _same_layout(grad_y, x)
    rstd = rstd.to(pdt).contiguous()
    w, sc, sh = (_param(t, pdt) for t in (weight, scale, shift))
    need_x, need_w, need_s, need_sh = needs
    gx = torch.empty_like(x) if need_x else None
    gw = torch.empty(c, dtype=pdt) if need_w and w is not None else None
    gs = torch.empty((n, c), dtype=pdt) if need_s and sc is not None else None
    gsh = torch.empty((n, c), dtype=pdt) if need_sh and sh is not None else None
    _C.channel_rms_norm_bwd(grad_y.data_ptr(), x.data_ptr(), rstd.data_ptr(), _ptr(w), _ptr(sc),
                            _ptr(sh), _ptr(gx), _ptr(gw), _ptr(gs), _ptr(gsh), n, c, s, float(eps),
                            cl, _DTYPE_CODES[x.dtype], _ACTIVATION_CODES[activation], _threads())
    params = (weight, scale, shift)
    return (gx,) + tuple(None if gr is None else gr.to(p.dtype).reshape(p.shape)
                         for gr, p in zip((gw, gs, gsh), params))


# ------------------------------------------------------------ dynamic thresholding
def _flat_reason(*tensors) -> Optional[str]:
    """All given tensors on the CPU, same supported dtype and identical dense strides."""
    ref = tensors[0]
    for i, t in enumerate(tensors):
        if t is None:
            continue
        why = _layout_reason(t, f"tensor {i}")
        if why is not None:
            return why
        # strides of size-1 dims do not move through memory: only the others must match
        if t.dtype != ref.dtype or t.shape != ref.shape or any(
                a != b for size, a, b in zip(t.shape, t.stride(), ref.stride()) if size > 1):
            return "tensors must share dtype, shape and memory layout"
    return None


def _threshold_supports(x0, *rest) -> Optional[str]:
    return _flat_reason(x0)


@register("dynamic_threshold", "cpu", supports=_threshold_supports)
def dynamic_threshold(x0, percentile, min_value, max_value=math.inf):
    n = x0.shape[0]
    y = torch.empty_like(x0)
    _C.dynamic_threshold(x0.data_ptr(), y.data_ptr(), n, x0.numel() // n, _DTYPE_CODES[x0.dtype],
                         float(percentile), float(min_value), float(max_value), _threads())
    return y


def _step_supports(z_t, pred_cond, pred_uncond=None, noise=None, *rest) -> Optional[str]:
    return _flat_reason(z_t, pred_cond, pred_uncond, noise)


@register("sampler_step", "cpu", supports=_step_supports)
def sampler_step(z_t, pred_cond, pred_uncond, guidance_scale, coefs, noise, threshold,
                 percentile, min_value):
    n = z_t.shape[0]
    coefs = coefs.detach().to(device="cpu", dtype=torch.float64).contiguous()
    if coefs.shape != (n, 5):
        raise ValueError(f"coefs must have shape ({n}, 5), got {tuple(coefs.shape)}")
    out = torch.empty_like(z_t)
    _C.sampler_step(z_t.data_ptr(), pred_cond.data_ptr(), _ptr(pred_uncond), _ptr(noise),
                    out.data_ptr(), coefs.data_ptr(), n, z_t.numel() // n, _DTYPE_CODES[z_t.dtype],
                    float(guidance_scale), _THRESHOLD_CODES[threshold], float(percentile),
                    float(min_value), _threads())
    return out


# ----------------------------------------------------------------------- attention
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FLASH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _attention_supports(q, k, v, mask=None) -> Optional[str]:
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if t.device.type != "cpu":
            return f"{name} must be a CPU tensor"
        if t.dtype not in _DTYPE_CODES:
            return f"{name} has unsupported dtype {t.dtype}"
    return None


def _use_flash(q) -> bool:
    return _FLASH is not None and _FLASH_BWD is not None and q.dtype in _FLASH_DTYPES


def _additive_mask(mask, q):
    """(B, 1, 1, Lk) 0 / -inf mask in q's dtype, with fully masked batches opened up
    (their results are zeroed afterwards), and the (B,) bool of those batches."""
    if mask is None:
        return None, None
    empty = ~mask.any(dim=1)
    keep = mask | empty[:, None]
    add = torch.zeros(keep.shape, dtype=q.dtype).masked_fill_(~keep, float("-inf"))
    return add[:, None, None, :], (empty if bool(empty.any()) else None)


def _zero_batches(t, empty, value=0.0):
    return t.masked_fill(empty.reshape(-1, *([1] * (t.ndim - 1))), value)


@register("attention_fwd", "cpu", supports=_attention_supports)
def attention_fwd(q, k, v, mask, scale):
    if not _use_flash(q):
        return implementation("attention_fwd", "torch")(q, k, v, mask, scale)
    add, empty = _additive_mask(mask, q)
    out, lse = _FLASH(q, k, v, 0.0, False, attn_mask=add, scale=scale)
    out, lse = out.contiguous(), lse.float().contiguous()
    if empty is not None:
        out = _zero_batches(out, empty)
        lse = _zero_batches(lse, empty, float("-inf"))
    return out, lse


@register("attention_bwd", "cpu", supports=_attention_supports)
def attention_bwd(grad_out, q, k, v, mask, out, lse, scale):
    if not _use_flash(q):
        return implementation("attention_bwd", "torch")(grad_out, q, k, v, mask, out, lse, scale)
    add, empty = _additive_mask(mask, q)
    if empty is not None:  # finite stand-ins where the forward zeroed the batch
        lse = _zero_batches(lse, empty)
    dq, dk, dv = _FLASH_BWD(grad_out.contiguous(), q, k, v, out, lse.float(), 0.0, False,
                            attn_mask=add, scale=scale)
    if empty is not None:
        dq, dk, dv = (_zero_batches(g, empty) for g in (dq, dk, dv))
    return dq.contiguous(), dk.contiguous(), dv.contiguous()
