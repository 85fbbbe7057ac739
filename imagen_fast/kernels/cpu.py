"""Backend "cpu": the C++/OpenMP kernels of csrc/cpu, through imagen_fast._C.

Tensors cross as data pointers, sizes, a layout flag and a dtype code; outputs are
allocated here with torch and written completely by the kernels. The kernels run
with torch's thread count (torch.get_num_threads()) and release the GIL.

The module holds two variants of the kernels, chosen at run time: "avx512" (x86-64
CPUs with AVX-512 F/BW/DQ/VL) and "portable" (the build's base ISA: AVX2 on the usual
x86 machine). IMAGEN_FAST_CPU_ISA=auto|portable|avx512 picks one when this module
loads (auto: the best this CPU runs); `use_cpu_isa` switches inside a block (tests and
benchmarks run both paths in one process).

Attention: see the comment above `SMALL_QUERIES` below. Dtypes the kernels do not take
(float64) run the torch backend's maths, looked up in the registry (imagen_fast.ops
registers it when it loads, before any backend runs).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Dict, Iterator, Optional

import torch
from torch.autograd.function import once_differentiable

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
if _C is None or not hasattr(_C, "group_norm_fwd") or not hasattr(_C, "set_cpu_isa"):
    raise ImportError("imagen_fast._C is not built (or is an older build without the CPU kernel variants)")

ISA_ENV = "IMAGEN_FAST_CPU_ISA"
# Read once, here: a bad value raises ValueError (naming the variable) at the first op.
_C.set_cpu_isa(os.environ.get(ISA_ENV, "auto").strip().lower() or "auto")


def cpu_isa() -> str:
    """The variant of the CPU kernels that runs now: "portable" or "avx512"."""
    return _C.cpu_isa()


def cpu_isas() -> Dict[str, str]:
    """Every variant: "available" or why not (not built, or a CPU feature missing)."""
    return dict(_C.cpu_isas())


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[str]:
    """Run the CPU kernels of variant `name` ("auto", "portable", "avx512") inside the
    block (process-wide, not per thread). Yields the variant's name."""
    before = _C.cpu_isa()
    _C.set_cpu_isa(name)
    try:
        yield _C.cpu_isa()
    finally:
        _C.set_cpu_isa(before)


def _threads() -> int:
    return torch.get_num_threads()


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _layout_reason(t: torch.Tensor, name: str) -> Optional[str]:
    if not t.is_cpu:
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


def _as_param(grad: Optional[torch.Tensor], p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A parameter's gradient (computed in the statistics dtype, flat) in p's dtype and shape."""
    if grad is None:
        return None
    if grad.dtype != p.dtype:
        grad = grad.to(p.dtype)
    return grad if grad.shape == p.shape else grad.reshape(p.shape)


# ----------------------------------------------------------------- group_norm_silu
# by_dtype (the automatic choice remembered per dtype): the op layer checks x's dims and
# hands the norms x in a kernel layout (kernel_layout; the backward gets the forward's x)
def _gn_supports(x, *rest) -> Optional[str]:
    why = _layout_reason(x, "x")
    if why is None and x.ndim < 2:
        return "x must have at least 2 dims"
    return why


def _gn_geometry(x: torch.Tensor, num_groups: int):
    n, c = x.shape[:2]
    s = x.numel() // (n * c) if n * c else 0
    return n, c, s, num_groups, _channels_last(x)


@register("group_norm_silu_fwd", "cpu", supports=_gn_supports, by_dtype=True)
def group_norm_silu_fwd(x, num_groups, weight, bias, eps, scale, shift, activation):
    pdt = _stat_dtype(x)
    n, c, s, g, cl = _gn_geometry(x, num_groups)
    w, b, sc, sh = _param(weight, pdt), _param(bias, pdt), _param(scale, pdt), _param(shift, pdt)
    y = torch.empty_like(x)
    mean = torch.empty((n, g), dtype=pdt)
    rstd = torch.empty((n, g), dtype=pdt)
    _C.group_norm_fwd(x.data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), _ptr(w),
                      _ptr(b), _ptr(sc), _ptr(sh), n, c, s, g, float(eps), cl,
                      _DTYPE_CODES[x.dtype], _ACTIVATION_CODES[activation], _threads())
    return y, mean, rstd


@register("group_norm_silu_bwd", "cpu", supports=_gn_supports, by_dtype=True)
def group_norm_silu_bwd(grad_y, x, mean, rstd, num_groups, weight, bias, scale, shift,
                        activation, needs):
    pdt = _stat_dtype(x)
    n, c, s, g, cl = _gn_geometry(x, num_groups)
    grad_y = _same_layout(grad_y, x)
    mean, rstd = _param(mean, pdt), _param(rstd, pdt)
    w, b, sc, sh = _param(weight, pdt), _param(bias, pdt), _param(scale, pdt), _param(shift, pdt)
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
    return (gx, _as_param(gw, weight), _as_param(gb, bias), _as_param(gs, scale), _as_param(gsh, shift))


# ------------------------------------------------------------ channel_rms_norm_silu
@register("channel_rms_norm_silu_fwd", "cpu", supports=_gn_supports, by_dtype=True)
def channel_rms_norm_silu_fwd(x, weight, eps, scale, shift, activation):
    pdt = _stat_dtype(x)
    n, c, s, _, cl = _gn_geometry(x, 1)
    w, sc, sh = _param(weight, pdt), _param(scale, pdt), _param(shift, pdt)
    y = torch.empty_like(x)
    rstd = torch.empty((n, s), dtype=pdt)
    _C.channel_rms_norm_fwd(x.data_ptr(), y.data_ptr(), rstd.data_ptr(), _ptr(w), _ptr(sc), _ptr(sh),
                            n, c, s, float(eps), cl, _DTYPE_CODES[x.dtype],
                            _ACTIVATION_CODES[activation], _threads())
    return y, rstd


@register("channel_rms_norm_silu_bwd", "cpu", supports=_gn_supports, by_dtype=True)
def channel_rms_norm_silu_bwd(grad_y, x, rstd, weight, eps, scale, shift, activation, needs):
    pdt = _stat_dtype(x)
    n, c, s, _, cl = _gn_geometry(x, 1)
    grad_y = _same_layout(grad_y, x)
    rstd = _param(rstd, pdt)
    w, sc, sh = _param(weight, pdt), _param(scale, pdt), _param(shift, pdt)
    need_x, need_w, need_s, need_sh = needs
    gx = torch.empty_like(x) if need_x else None
    gw = torch.empty(c, dtype=pdt) if need_w and w is not None else None
    gs = torch.empty((n, c), dtype=pdt) if need_s and sc is not None else None
    gsh = torch.empty((n, c), dtype=pdt) if need_sh and sh is not None else None
    _C.channel_rms_norm_bwd(grad_y.data_ptr(), x.data_ptr(), rstd.data_ptr(), _ptr(w), _ptr(sc),
                            _ptr(sh), _ptr(gx), _ptr(gw), _ptr(gs), _ptr(gsh), n, c, s, float(eps),
                            cl, _DTYPE_CODES[x.dtype], _ACTIVATION_CODES[activation], _threads())
    return gx, _as_param(gw, weight), _as_param(gs, scale), _as_param(gsh, shift)


# ------------------------------------------------------------ dynamic thresholding
def _flat_reason(*tensors) -> Optional[str]:
    """All given tensors on the CPU, same supported dtype and identical dense strides."""
    ref = tensors[0]
    why = _layout_reason(ref, "tensor 0")
    if why is not None:
        return why
    dtype, shape, stride = ref.dtype, ref.shape, ref.stride()
    for i, t in enumerate(tensors):
        if t is None or t is ref:
            continue
        # ref passed: a CPU tensor with its dtype and strides passes too (checked on every call)
        if t.is_cpu and t.dtype == dtype and t.shape == shape and t.stride() == stride:
            continue
        why = _layout_reason(t, f"tensor {i}")
        if why is not None:
            return why
        # strides of size-1 dims do not move through memory: only the others must match
        if t.dtype != dtype or t.shape != shape or any(
                a != b for size, a, b in zip(shape, t.stride(), stride) if size > 1):
            return "tensors must share dtype, shape and memory layout"
    return None


def _threshold_supports(x0, *rest) -> Optional[str]:
    return _flat_reason(x0)


# by_dtype: ops.dynamic_threshold and ops.sampler_step hand over x in a kernel layout
# (contiguous or channels-last) and the other tensors with x's dtype, shape and strides,
# so whether these kernels take a call depends on the device and dtype alone (the
# remembered choice saves sampler_step's supports, 1.9 of its ~11 us op overhead)
@register("dynamic_threshold", "cpu", supports=_threshold_supports, by_dtype=True)
def dynamic_threshold(x0, percentile, min_value, max_value=math.inf):
    n = x0.shape[0]
    y = torch.empty_like(x0)
    _C.dynamic_threshold(x0.data_ptr(), y.data_ptr(), n, x0.numel() // n, _DTYPE_CODES[x0.dtype],
                         float(percentile), float(min_value), float(max_value), _threads())
    return y


def _step_supports(z_t, pred_cond, pred_uncond=None, noise=None, *rest) -> Optional[str]:
    return _flat_reason(z_t, pred_cond, pred_uncond, noise)


@register("sampler_step", "cpu", supports=_step_supports, by_dtype=True)
def sampler_step(z_t, pred_cond, pred_uncond, guidance_scale, coefs, noise, threshold,
                 percentile, min_value):
    n = z_t.shape[0]
    if coefs.dtype != torch.float64 or not coefs.is_cpu:
        coefs = coefs.detach().to(device="cpu", dtype=torch.float64)
    if coefs.shape != (n, 5):
        raise ValueError(f"coefs must have shape ({n}, 5), got {tuple(coefs.shape)}")
    st = coefs.stride()
    if st[1] != 1 or st[0] not in (0, 5):    # a row expanded to (n, 5) passes as stride 0
        coefs, st = coefs.contiguous(), (5, 1)
    out = torch.empty_like(z_t)
    _C.sampler_step(z_t.data_ptr(), pred_cond.data_ptr(), _ptr(pred_uncond), _ptr(noise),
                    out.data_ptr(), coefs.data_ptr(), st[0] if n > 1 else 5, n, z_t.numel() // n,
                    _DTYPE_CODES[z_t.dtype], float(guidance_scale), _THRESHOLD_CODES[threshold],
                    float(percentile), float(min_value), _threads())
    return out


# ----------------------------------------------------------------------- attention
# Each path keeps the contract (a query whose batch masks every key gets zeros and zero
# gradients):
#  - csrc/cpu/attention.cpp's forward (float32/16-bit): per query for Lq <= SMALL_QUERIES
#    (torch's flash kernel is mostly fixed cost there: Imagen's text pooling has one
#    query), tiled above (register-tiled Q K^T and P V over the valid keys only, scores of
#    a 64-query block kept in L2; up to _KERNEL_MAX_KEYS keys). The op over the best SDPA
#    backend forward, bench_ops at 55c28cd (2-core Xeon, AVX-512): 8x3x64x128x64 masked
#    1.54x, no mask 1.41x, 1x2x256x320x64 1.19x, 1x16x1024x1088x64 1.33x, 1.01-2.20x in all.
#    Its backward: the per-query kernel's for Lq <= SMALL_QUERIES, else torch's flash
#    backward (aten._scaled_dot_product_flash_attention_for_cpu_backward) given the
#    kernel's output and log-sum-exp;
#  - the custom ops (what torch.compile and export see; they return the log-sum-exp too)
#    run that pair, and torch's flash forward with an additive 0 / -inf mask beyond it;
#  - in eager mode ops.attention asks `attention` below for a differentiable result:
#    short queries through _KernelAttention (a bare autograd.Function: at 8x8x1x64x32
#    masked 1.48x the best SDPA backend forward+backward); without gradients the kernel;
#    with gradients matmuls and a softmax for the float32/64 score matrices where they win
#    (_MatmulAttention, the softmax saved), else F.scaled_dot_product_attention with the
#    boolean mask and its own autograd (its C++ autograd node costs ~60 us less per call
#    than the kernel's forward + flash backward through a Python autograd.Function, which
#    measured 0.93-1.05x SDPA).
SMALL_QUERIES = 16
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNEL_MAX_KEYS = 4096
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FLASH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _attention_supports(q, k, v, mask=None) -> Optional[str]:
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not t.is_cpu:
            return f"{name} must be a CPU tensor"
        if t.dtype not in _DTYPE_CODES:
            return f"{name} has unsupported dtype {t.dtype}"
    return None


# The portable (AVX2) variant's tiled forward, measured on the AVX-512 Xeon with torch
# restricted to AVX2 as on an AVX2-only CPU (ATEN_CPU_CAPABILITY=avx2, MKL and oneDNN
# likewise), the op over SDPA, bench_ops at 55c28cd: 1.05-1.17x at 256 x 320
# (1x2x256x320x64 1.05, D 128 1.08), 1.24-1.70x at 64 queries, 1.12x at 1x16x1024x1088x64;
# the kernel alone 1.01-1.07x at 2048 keys and 0.90-0.95x at 4096, where torch's GEMMs win.
# Against torch's AVX-512 kernels (the portable variant forced on an AVX-512 CPU) it wins
# up to 128 keys (masked 1.24-1.36x, unmasked 0.96-1.01x where SDPA through the op layer
# measured 0.90-0.94x) and loses from 256 x 320 on (0.79-0.89x).
_TORCH_AVX512 = torch.backends.cpu.get_cpu_capability().upper().startswith(("AVX512", "AMX"))
_PORTABLE_MAX_KEYS = 2048          # torch as wide as the portable variant (an AVX2 CPU)
_PORTABLE_MAX_KEYS_AVX512 = 128    # torch on AVX-512


def _kernel(q, k, v) -> bool:
    """Whether csrc/cpu/attention.cpp runs the call: float32 / 16-bit rows of unit stride,
    and above SMALL_QUERIES at most _KERNEL_MAX_KEYS keys (a block's scores stay in L2),
    fewer in the portable variant (above)."""
    if not (q.dtype in _KERNEL_DTYPES and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1):
        return False
    lq, lk = q.shape[2], k.shape[2]
    if lq <= SMALL_QUERIES:
        return True
    if _C.cpu_isa() != "portable":
        return lk <= _KERNEL_MAX_KEYS
    return lk <= (_PORTABLE_MAX_KEYS_AVX512 if _TORCH_AVX512 else _PORTABLE_MAX_KEYS)


def _small(q, k, v) -> bool:
    """The kernel with its short-query backward (csrc/cpu/attention.cpp's `backward`)."""
    return q.shape[2] <= SMALL_QUERIES and _kernel(q, k, v)


def _bhl_strides(*ts) -> tuple:
    return sum((t.stride()[:3] for t in ts), ())


def _kernel_fwd(q, k, v, mask, scale, with_lse: bool = True):
    """out (and the log-sum-exp, or None without with_lse) of csrc/cpu/attention.cpp."""
    b, h, lq, d = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, h, lq), dtype=torch.float32) if with_lse else None
    _C.attention_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(mask), out.data_ptr(), _ptr(lse),
                     b, h, lq, k.shape[2], d, scale, q.stride()[:3] + k.stride()[:3] + v.stride()[:3],
                     _DTYPE_CODES[q.dtype], _threads())
    return out, lse


def _small_bwd(grad_out, q, k, v, mask, out, lse, scale):
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    out, lse = out.contiguous(), lse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype)
    dk = torch.empty(k.shape, dtype=k.dtype)
    dv = torch.empty(v.shape, dtype=v.dtype)
    b, h, lq, d = q.shape
    _C.attention_bwd(grad_out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(mask), out.data_ptr(),
                     lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), b, h, lq, k.shape[2], d,
                     float(scale), _bhl_strides(q, k, v, grad_out), _DTYPE_CODES[q.dtype], _threads())
    return dq, dk, dv


_SDPA_ZEROES_EMPTY: Dict[torch.dtype, bool] = {}


def _sdpa_zeroes_empty_rows(dtype: torch.dtype) -> bool:
    """Whether this torch's SDPA already gives a query with every key masked zeros and zero
    gradients (it does from torch 2.5 on): asked once per dtype on a tiny problem."""
    known = _SDPA_ZEROES_EMPTY.get(dtype)
    if known is None:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 1, 2, 4, generator=g).to(dtype).requires_grad_() for _ in range(3))
        mask = torch.tensor([[True, False, True], [False, False, False]])[:, None, None, :]
        k2, v2 = (t.detach()[:, :, :1].expand(2, 1, 3, 4).contiguous().requires_grad_() for t in (k, v))
        with torch.enable_grad():
            out = torch.nn.functional.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)
            grads = torch.autograd.grad(out.float().sum(), [q, k2, v2])
        known = bool((out[1] == 0).all()) and all(bool(torch.isfinite(t).all() and (t[1] == 0).all())
                                                  for t in grads)
        _SDPA_ZEROES_EMPTY[dtype] = known
    return known


# With gradients, float32/64 score matrices up to a size run as two matmuls and a softmax
# (_MatmulAttention, the probabilities saved) faster than SDPA's flash or math kernels,
# where the head dimension gives the matmuls work. 2-core Xeon (AVX-512), rotated inputs,
# forward+backward over SDPA: 8x4x64x128x64 1.11x, 8x3x64x320x64 1.09x, 1x32x64x128x64
# 1.17x (masked); D = 128: 1x8x256x320x128 1.13x, 1x8x4096x64x128 1.20x; but
# 1x2x256x320x64 0.93x, 8x2x256x320x64 0.90-0.95x, 8x2x256x512x64 0.94x (D = 64: the
# saved probabilities outgrow the caches first), the training step of tiny-base32
# (8x4x256x320x16) 0.66x, flash far ahead at 1x16x1024x1088x64 (0.80x). Without gradients
# they serve float64 only (the kernel takes the others): no mask, up to 8192 scores.
# Where torch runs AVX2 (an AVX2 host; emulated as above), its flash kernels lose that edge
# without a mask: the matmuls train 1.01-1.05x SDPA at 8x2x256x320x64, 1x24x256x320x64 and
# 8x2x256x512x64 (SDPA through the op layer 0.99x, the eager composite 0.98x in bench_ops),
# so there the per-head limit drops for unmasked calls (masked ones: 0.93-1.05x, SDPA kept).
_MATMUL_MAX_SCORES = 8192              # per head, forward only, no mask
_TRAIN_MATMUL_MAX_SCORES = 1 << 15     # per head, with gradients, D < _TRAIN_MATMUL_WIDE_D
_TRAIN_MATMUL_WIDE_D = 128             # from this head dimension no per-head limit
_TRAIN_MATMUL_MAX_TOTAL = 1 << 22      # in all, with gradients
_TRAIN_MATMUL_MIN_D = 32               # head dimension, with gradients
_MATMUL_DTYPES = (torch.float32, torch.float64)


def _sdpa(q, k, v, mask, scale):
    F = torch.nn.functional
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    b, lk = mask.shape
    if _sdpa_zeroes_empty_rows(q.dtype):   # mask is contiguous (ops.attention): a view is cheapest
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.view(b, 1, 1, lk), scale=scale)
    empty = ~mask.any(dim=1)
    if not bool(empty.any()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.view(b, 1, 1, lk), scale=scale)
    keep = (mask | empty[:, None]).view(b, 1, 1, lk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    return out * (~empty).to(out.dtype)[:, None, None, None]   # zeros, and zero gradients


class _KernelAttention(torch.autograd.Function):
    """csrc/cpu/attention.cpp's forward with autograd, for eager mode; the backward is the
    custom op's (the short-query kernel's, or torch's flash backward above SMALL_QUERIES)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        out, lse = _kernel_fwd(q, k, v, mask, scale)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, mask, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(grad_out, q, k, v, mask, out, lse, ctx.scale)
        return dq, dk, dv, None, None


def _matmul_forward(q, k, v, mask, scale):
    """softmax(q k^T scale + mask) v as two matmuls, and what the backward needs. A batch
    whose mask is all False attends to every key, then its output is zeroed."""
    qs = q * scale
    s = torch.matmul(qs, k.transpose(-2, -1))
    add, empty = _additive_mask(mask, q)
    if add is not None:
        s.add_(add)
    p = torch.softmax(s, -1)
    out = torch.matmul(p, v)
    if empty is not None:
        out = _zero_batches(out, empty)
    return out, (qs, p, empty)


class _MatmulAttention(torch.autograd.Function):
    """_matmul_forward with the probabilities P saved; backward dv = P^T g, dS =
    softmax_backward(g v^T, P), dq = dS k scale, dk = dS^T q scale (a fully masked batch's
    output gradient zeroed first, so all of its gradients are zero)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        out, (qs, p, empty) = _matmul_forward(q, k, v, mask, scale)
        ctx.save_for_backward(qs, k, v, p, empty)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qs, k, v, p, empty = ctx.saved_tensors
        if empty is not None:
            grad_out = _zero_batches(grad_out, empty)
        dv = torch.matmul(p.transpose(-2, -1), grad_out)
        ds = torch._softmax_backward_data(torch.matmul(grad_out, v.transpose(-2, -1)), p, -1, p.dtype)
        dq = torch.matmul(ds, k).mul_(ctx.scale)
        dk = torch.matmul(ds.transpose(-2, -1), qs)
        return dq, dk, dv, None, None


def _eager_path(q, k, v, masked: bool, grad: bool) -> str:
    """Which of `attention`'s paths runs a call (see the comments above)."""
    kernel = _kernel(q, k, v)
    b, h, lq, d = q.shape
    if kernel and lq <= SMALL_QUERIES:
        return "kernel"
    scores = lq * k.shape[2]
    if grad:
        if (q.dtype in _MATMUL_DTYPES and d >= _TRAIN_MATMUL_MIN_D and b * h * scores <= _TRAIN_MATMUL_MAX_TOTAL
                and (scores <= _TRAIN_MATMUL_MAX_SCORES or d >= _TRAIN_MATMUL_WIDE_D
                     or not (masked or _TORCH_AVX512))):
            return "matmul"
        return "sdpa"
    if kernel:
        return "kernel"
    if q.dtype in _MATMUL_DTYPES and not masked and scores <= _MATMUL_MAX_SCORES:
        return "matmul"
    return "sdpa"


def _run_kernel(q, k, v, mask, scale, grad):
    return _KernelAttention.apply(q, k, v, mask, scale) if grad else _kernel_fwd(q, k, v, mask, scale, False)[0]


def _run_matmul(q, k, v, mask, scale, grad):
    return _MatmulAttention.apply(q, k, v, mask, scale) if grad else _matmul_forward(q, k, v, mask, scale)[0]


_EAGER_PATHS = {"kernel": _run_kernel, "matmul": _run_matmul,
                "sdpa": lambda q, k, v, mask, scale, grad: _sdpa(q, k, v, mask, scale)}


@register("attention", "cpu", supports=_attention_supports)
def attention(q, k, v, mask, scale):
    """Differentiable attention for ops.attention in eager mode: csrc/cpu/attention.cpp
    for short queries and for forward-only calls, matmuls where they train faster
    (`_eager_path`), otherwise SDPA with its own autograd."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return _EAGER_PATHS[_eager_path(q, k, v, mask is not None, grad)](q, k, v, mask, scale, grad)


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


@register("attention_fwd", "cpu", supports=_attention_supports, by_dtype=True)
def attention_fwd(q, k, v, mask, scale):
    if _kernel(q, k, v):
        return _kernel_fwd(q, k, v, mask, scale)
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
    if _small(q, k, v):
        return _small_bwd(grad_out, q, k, v, mask, out, lse, scale)
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
