"""The public ops: argument checks, torch.library registration, autograd.

Every op is a ``torch.library.custom_op`` with a fake implementation, so
``torch.compile(fullgraph=True)`` traces through it without a graph break and
``torch.export`` sees it. The custom op's body asks ``dispatch.resolve`` for the
backend implementation at run time.

In plain eager mode (see ``_eager``) a call skips the custom op's dispatch, which costs
more than a whole call of a small kernel (the cascade makes thousands of small
group-norm calls per sample): it runs the same backend function directly, through an
``autograd.Function`` with the same backward when gradients are wanted. Whatever
watches the call (torch.compile, torch.export, a dispatch mode such as FakeTensorMode
or benchmarks/shapes.py's recorder, a jit trace, functorch) sees the custom op.
tests/ops/test_ops_api.py checks that both paths give the same results and errors.
"""
from __future__ import annotations

import math
from array import array
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..core import ACTIVATIONS, THRESHOLDS, check_attention_shapes, check_float, check_percentile
from ..core import step_coefficients as core_step_coefficients
from ..core.sampling import FLOATS
from ..kernels.layout import is_channels_last, kernel_layout, like_layout, stats_dtype
from . import dispatch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- checks
def _check_tensor(t, name: str, *, ndim=None, min_ndim=None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")


def _check_same_device(ref: Tensor, t: Tensor, name: str, ref_name: str) -> None:
    if t.is_cpu and ref.is_cpu:         # the one CPU device: no torch.device objects made
        return
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


# ------------------------------------------------------------------ eager fast path
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch = torch._C._are_functorch_transforms_active
_jit_tracing = torch._C._get_tracing_state
_is_compiling = torch.compiler.is_compiling


_fast_path = True


def _eager(x: Tensor) -> bool:
    """True when a call may run its backend directly instead of through the custom op:
    eager execution on CPU or CUDA tensors that nothing traces or intercepts."""
    return (_fast_path and (x.is_cpu or x.is_cuda) and not _is_compiling() and not _dispatch_modes()
            and not _function_modes() and not _functorch() and _jit_tracing() is None)


class custom_ops_only:
    """Inside ``with custom_ops_only():`` every op call goes through its custom op, as under
    torch.compile (for tests and benchmarks of the eager fast path; process-wide, not per
    thread). A class, not a generator: benchmarks enter it around single tiny calls."""

    def __enter__(self):
        global _fast_path
        self._before, _fast_path = _fast_path, False

    def __exit__(self, *exc):
        global _fast_path
        _fast_path = self._before


def _wants_grad(*tensors) -> bool:
    """Whether autograd must record the call (grad mode on and an input requiring grad)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


# ----------------------------------------------------------------- group_norm_silu
@torch.library.custom_op("imagen_fast::group_norm_silu_fwd", mutates_args=())
def _gn_fwd(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
            eps: float, scale: Optional[Tensor], shift: Optional[Tensor],
            activation: str) -> Tuple[Tensor, Tensor, Tensor]:
    fn = dispatch.resolve("group_norm_silu_fwd", x.device, x)
    return fn(x, num_groups, weight, bias, eps, scale, shift, activation)


@_gn_fwd.register_fake
def _(x, num_groups, weight, bias, eps, scale, shift, activation):
    stats = x.new_empty((x.shape[0], num_groups), dtype=stats_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("imagen_fast::group_norm_silu_bwd", mutates_args=())
def _gn_bwd(grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, num_groups: int,
            weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
            shift: Optional[Tensor], activation: str, needs: List[bool]) -> List[Tensor]:
    fn = dispatch.resolve("group_norm_silu_bwd", x.device, x)
    grads = fn(grad_y, x, mean, rstd, num_groups, weight, bias, scale, shift, activation,
               tuple(needs))
    # A custom op cannot return None: an empty tensor stands for "no gradient".
    return [g if g is not None else x.new_empty(0) for g in grads]


@_gn_bwd.register_fake
def _(grad_y, x, mean, rstd, num_groups, weight, bias, scale, shift, activation, needs):
    like = [x, weight, bias, scale, shift]
    return [torch.empty_like(t) if (t is not None and need) else x.new_empty(0)
            for t, need in zip(like, needs)]


def _gn_setup(ctx, inputs, output):
    x, num_groups, weight, bias, eps, scale, shift, activation = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups = num_groups
    ctx.activation = activation


def _gn_grads(ctx, grad_y, bwd):
    """The gradients of group_norm_silu_fwd's inputs, from ``bwd`` (the custom op, or the
    backend's function in eager mode)."""
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[2] and weight is not None, n[3] and bias is not None,
             n[5] and scale is not None, n[6] and shift is not None]
    grads = bwd(like_layout(grad_y, x), x, mean, rstd, ctx.num_groups, weight, bias,
                scale, shift, ctx.activation, needs)
    gx, gw, gb, gs, gsh = (g if need else None for g, need in zip(grads, needs))
    return gx, None, gw, gb, None, gs, gsh, None


def _gn_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    return _gn_grads(ctx, grad_y, _gn_bwd)


torch.library.register_autograd("imagen_fast::group_norm_silu_fwd", _gn_backward,
                                setup_context=_gn_setup)


def _gn_bwd_eager(grad_y, x, mean, rstd, num_groups, weight, bias, scale, shift, activation, needs):
    fn = dispatch.resolve("group_norm_silu_bwd", x.device, x)
    return fn(grad_y, x, mean, rstd, num_groups, weight, bias, scale, shift, activation, tuple(needs))


class _GroupNormEager(torch.autograd.Function):
    """group_norm_silu_fwd's custom op and autograd, minus the dispatch (eager mode)."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, scale, shift, activation):
        fn = dispatch.resolve("group_norm_silu_fwd", x.device, x)
        out = fn(x, num_groups, weight, bias, eps, scale, shift, activation)
        _gn_setup(ctx, (x, num_groups, weight, bias, eps, scale, shift, activation), out)
        return out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        return _gn_grads(ctx, grad_y, _gn_bwd_eager)


# The parameter checks run on every call of the norm ops (thousands per sample): x's shape
# and statistics dtype come from the caller, and nothing is converted that need not be.
def _film_param(t, name: str, x: Tensor, shape, pdt: torch.dtype) -> Optional[Tensor]:
    """scale/shift: (N, C) or (N, C, 1, ...) -> float32 (N, C); shape is x.shape."""
    if t is None:
        return None
    _check_tensor(t, name)
    _check_same_device(x, t, name, "x")
    n, c = shape[0], shape[1]
    ts = t.shape
    if len(ts) < 2 or ts[0] != n or ts[1] != c or (len(ts) > 2 and any(s != 1 for s in ts[2:])):
        raise ValueError(f"{name} must have shape (N, C) = ({n}, {c}) (or with trailing "
                         f"size-1 dims), got {tuple(ts)}")
    if len(ts) > 2:
        t = t.reshape(n, c)
    if t.dtype != pdt:
        t = t.to(pdt)
    return t if t.is_contiguous() else t.contiguous()


def _channel_param(t, name: str, x: Tensor, shape, pdt: torch.dtype) -> Optional[Tensor]:
    """weight/bias: (C,) -> float32 (C,); shape is x.shape."""
    if t is None:
        return None
    _check_tensor(t, name)
    _check_same_device(x, t, name, "x")
    ts = t.shape
    if len(ts) != 1 or ts[0] != shape[1]:
        raise ValueError(f"{name} must have shape (C,) = ({shape[1]},), got {tuple(ts)}")
    if t.dtype != pdt:
        t = t.to(pdt)
    return t if t.is_contiguous() else t.contiguous()


def _check_norm_args(x: Tensor, eps, activation) -> Tuple[float, str]:
    """The checks the norm ops share: x not empty, eps > 0, a known activation."""
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    eps = check_float(eps, "eps", low=0.0, low_open=True)
    act = "none" if activation is None else activation
    if act not in ACTIVATIONS:
        raise ValueError(f"activation must be 'silu', 'gelu' or None, got {activation!r}")
    return eps, act


def group_norm_silu(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    activation: Optional[str] = "silu",
) -> Tensor:
    """GroupNorm + optional FiLM + activation, fused.

    y = act(((x - mean) * rstd * weight + bias) * (1 + scale) + shift)

    x: (N, C, *spatial), contiguous or channels_last (other layouts are made
    contiguous); the output keeps x's layout and dtype. num_groups must divide C.
    weight, bias: (C,) or None. scale, shift: (N, C) (trailing size-1 dims allowed)
    or None. activation: "silu", "gelu" (exact erf form) or None. Statistics are
    computed in float32 (float64 for float64 inputs) from x as given.
    """
    _check_tensor(x, "x", min_ndim=2)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    shape = x.shape
    c = shape[1]
    if num_groups <= 0 or c % num_groups != 0:
        raise ValueError(f"num_groups must be a positive divisor of C={c}, got {num_groups}")
    eps, act = _check_norm_args(x, eps, activation)
    pdt = stats_dtype(x)
    weight = _channel_param(weight, "weight", x, shape, pdt)
    bias = _channel_param(bias, "bias", x, shape, pdt)
    scale = _film_param(scale, "scale", x, shape, pdt)
    shift = _film_param(shift, "shift", x, shape, pdt)
    x = kernel_layout(x)
    if _eager(x):
        if _wants_grad(x, weight, bias, scale, shift):
            return _GroupNormEager.apply(x, num_groups, weight, bias, eps, scale, shift, act)
        fn = dispatch.resolve("group_norm_silu_fwd", x.device, x)
        return fn(x, num_groups, weight, bias, eps, scale, shift, act)[0]
    y, _, _ = _gn_fwd(x, num_groups, weight, bias, eps, scale, shift, act)
    return y


# ------------------------------------------------------------ channel_rms_norm_silu
@torch.library.custom_op("imagen_fast::channel_rms_norm_silu_fwd", mutates_args=())
def _rms_fwd(x: Tensor, weight: Optional[Tensor], eps: float, scale: Optional[Tensor],
             shift: Optional[Tensor], activation: str) -> Tuple[Tensor, Tensor]:
    fn = dispatch.resolve("channel_rms_norm_silu_fwd", x.device, x)
    return fn(x, weight, eps, scale, shift, activation)


@_rms_fwd.register_fake
def _(x, weight, eps, scale, shift, activation):
    n = x.shape[0]
    rstd = x.new_empty((n, x.numel() // max(1, n * x.shape[1])), dtype=stats_dtype(x))
    return torch.empty_like(x), rstd


@torch.library.custom_op("imagen_fast::channel_rms_norm_silu_bwd", mutates_args=())
def _rms_bwd(grad_y: Tensor, x: Tensor, rstd: Tensor, weight: Optional[Tensor], eps: float,
             scale: Optional[Tensor], shift: Optional[Tensor], activation: str,
             needs: List[bool]) -> List[Tensor]:
    fn = dispatch.resolve("channel_rms_norm_silu_bwd", x.device, x)
    grads = fn(grad_y, x, rstd, weight, eps, scale, shift, activation, tuple(needs))
    return [g if g is not None else x.new_empty(0) for g in grads]


@_rms_bwd.register_fake
def _(grad_y, x, rstd, weight, eps, scale, shift, activation, needs):
    like = [x, weight, scale, shift]
    return [torch.empty_like(t) if (t is not None and need) else x.new_empty(0)
            for t, need in zip(like, needs)]


def _rms_setup(ctx, inputs, output):
    x, weight, eps, scale, shift, activation = inputs
    ctx.save_for_backward(x, weight, scale, shift, output[1])
    ctx.eps = eps
    ctx.activation = activation


def _rms_grads(ctx, grad_y, bwd):
    """The gradients of channel_rms_norm_silu_fwd's inputs, from ``bwd`` (the custom op,
    or the backend's function in eager mode)."""
    x, weight, scale, shift, rstd = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1] and weight is not None, n[3] and scale is not None,
             n[4] and shift is not None]
    grads = bwd(like_layout(grad_y, x), x, rstd, weight, ctx.eps, scale, shift,
                ctx.activation, needs)
    gx, gw, gs, gsh = (g if need else None for g, need in zip(grads, needs))
    return gx, gw, None, gs, gsh, None


def _rms_backward(ctx, grad_y, _grad_rstd):
    return _rms_grads(ctx, grad_y, _rms_bwd)


torch.library.register_autograd("imagen_fast::channel_rms_norm_silu_fwd", _rms_backward,
                                setup_context=_rms_setup)


def _rms_bwd_eager(grad_y, x, rstd, weight, eps, scale, shift, activation, needs):
    fn = dispatch.resolve("channel_rms_norm_silu_bwd", x.device, x)
    return fn(grad_y, x, rstd, weight, eps, scale, shift, activation, tuple(needs))


class _RmsNormEager(torch.autograd.Function):
    """channel_rms_norm_silu_fwd's custom op and autograd, minus the dispatch (eager mode)."""

    @staticmethod
    def forward(ctx, x, weight, eps, scale, shift, activation):
        fn = dispatch.resolve("channel_rms_norm_silu_fwd", x.device, x)
        out = fn(x, weight, eps, scale, shift, activation)
        _rms_setup(ctx, (x, weight, eps, scale, shift, activation), out)
        return out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        return _rms_grads(ctx, grad_y, _rms_bwd_eager)


def channel_rms_norm_silu(
    x: Tensor,
    weight: Optional[Tensor] = None,
    eps: float = 1e-12,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    activation: Optional[str] = "silu",
) -> Tensor:
    """RMS norm over channels + optional FiLM + activation, fused.

    y = act(x / max(rms, eps) * weight * (1 + scale) + shift), where rms is the root
    mean square of x over the channel dim, for each sample and spatial position.

    x: (N, C, *spatial), contiguous or channels_last (other layouts are made
    contiguous); the output keeps x's layout and dtype. weight: (C,) or None.
    scale, shift: (N, C) (trailing size-1 dims allowed) or None. activation: "silu",
    "gelu" (exact erf form) or None. eps > 0 bounds the RMS from below, the way
    F.normalize's eps bounds the norm: imagen-pytorch's ChanRMSNorm
    (F.normalize(x, dim=1) * sqrt(C) * gamma) is eps = 1e-12 / sqrt(C),
    weight = gamma. The RMS is computed in float32 (float64 for float64 inputs).
    """
    _check_tensor(x, "x", min_ndim=2)
    eps, act = _check_norm_args(x, eps, activation)
    shape, pdt = x.shape, stats_dtype(x)
    weight = _channel_param(weight, "weight", x, shape, pdt)
    scale = _film_param(scale, "scale", x, shape, pdt)
    shift = _film_param(shift, "shift", x, shape, pdt)
    x = kernel_layout(x)
    if _eager(x):
        if _wants_grad(x, weight, scale, shift):
            return _RmsNormEager.apply(x, weight, eps, scale, shift, act)
        return dispatch.resolve("channel_rms_norm_silu_fwd", x.device, x)(x, weight, eps, scale, shift, act)[0]
    y, _ = _rms_fwd(x, weight, eps, scale, shift, act)
    return y


# ----------------------------------------------------------------------- attention
@torch.library.custom_op("imagen_fast::attention_fwd", mutates_args=())
def _attn_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
              scale: float) -> Tuple[Tensor, Tensor]:
    fn = dispatch.resolve("attention_fwd", q.device, q, k, v, mask)
    out, lse = fn(q, k, v, mask, scale)
    return out.contiguous(), lse.contiguous()     # what the fake promises, for every backend


@_attn_fwd.register_fake
def _(q, k, v, mask, scale):
    b, h, lq, _ = q.shape
    return q.new_empty((b, h, lq, v.shape[-1])), q.new_empty((b, h, lq), dtype=torch.float32)


@torch.library.custom_op("imagen_fast::attention_bwd", mutates_args=())
def _attn_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
              out: Tensor, lse: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    fn = dispatch.resolve("attention_bwd", q.device, q, k, v, mask)
    return tuple(g.contiguous() for g in fn(grad_out, q, k, v, mask, out, lse, scale))


@_attn_bwd.register_fake
def _(grad_out, q, k, v, mask, out, lse, scale):
    # Contiguous whatever the strides of q/k/v (views of a fused qkv projection).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup(ctx, inputs, output):
    q, k, v, mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.scale = scale


def _attn_backward(ctx, grad_out, _grad_lse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    dq, dk, dv = _attn_bwd(grad_out.contiguous(), q, k, v, mask, out, lse, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("imagen_fast::attention_fwd", _attn_backward,
                                setup_context=_attn_setup)


_FLOAT_SET = frozenset(FLOAT_DTYPES)


def _check_qkv(q, k, v) -> None:
    _check_tensor(q, "q", ndim=4)
    _check_tensor(k, "k", ndim=4)
    _check_tensor(v, "v", ndim=4)
    for t, name in ((k, "k"), (v, "v")):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        _check_same_device(q, t, name, "q")


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
              scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v with a key padding mask, flash-style where a kernel exists.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D), same dtype and device as q.
    key_padding_mask: (B, Lk) bool, True = attend, or None. A query with no key to
    attend to (its batch's mask all False) outputs zeros and gets zero gradients.
    scale defaults to 1 / sqrt(D).
    """
    # The usual call (CPU tensors, one float dtype, 4 dims) passes in one expression; any
    # other goes through the checks that say what is wrong (or accept it: CUDA tensors).
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor) and q.dtype in _FLOAT_SET
            and k.dtype is q.dtype and v.dtype is q.dtype and q.ndim == 4 and k.ndim == 4 and v.ndim == 4
            and q.is_cpu and k.is_cpu and v.is_cpu):
        _check_qkv(q, k, v)
    b, h, lq, d = check_attention_shapes(q.shape, k.shape, v.shape)
    if key_padding_mask is not None:
        m = key_padding_mask
        if not (isinstance(m, Tensor) and m.dtype is torch.bool and m.ndim == 2 and m.is_cpu and q.is_cpu):
            _check_tensor(m, "key_padding_mask", ndim=2, dtypes=(torch.bool,))
            _check_same_device(q, m, "key_padding_mask", "q")
        ms, lk = m.shape, k.shape[2]
        if ms[0] != b or ms[1] != lk:
            raise ValueError(f"key_padding_mask must have shape (B, Lk) = ({b}, {lk}), got {tuple(ms)}")
        if not m.is_contiguous():
            key_padding_mask = m.contiguous()
    scale = 1.0 / math.sqrt(d) if scale is None else check_float(scale, "scale", low=0.0, low_open=True)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if _eager(q):
        # A backend's own differentiable path, where it has one (cpu: SDPA with its own
        # autograd): the custom op's Python autograd would cost more than a
        # small call itself. torch.compile and export see the custom op.
        eager = dispatch.resolve_eager("attention", q.device, q, k, v, key_padding_mask)
        if eager is not None:
            return eager(q, k, v, key_padding_mask, scale)
    out, _ = _attn_fwd(q, k, v, key_padding_mask, scale)
    return out


# ------------------------------------------------------------ dynamic thresholding
@torch.library.custom_op("imagen_fast::dynamic_threshold", mutates_args=())
def _dyn_thr(x0: Tensor, percentile: float, min_value: float, max_value: float) -> Tensor:
    fn = dispatch.resolve("dynamic_threshold", x0.device, x0)
    return fn(x0, percentile, min_value, max_value)


@_dyn_thr.register_fake
def _(x0, percentile, min_value, max_value):
    return torch.empty_like(x0)


def dynamic_threshold(x0: Tensor, percentile: float = 0.995, min_value: float = 1.0,
                      max_value: Optional[float] = None) -> Tensor:
    """Imagen's dynamic thresholding of a predicted clean image, per sample.

    s = percentile of |x0| over all non-batch dims, exact, with torch.quantile's
    default linear interpolation (also above torch.quantile's 2^24-element limit);
    s = max(s, min_value), then s = min(s, max_value) when max_value is given (the
    order of torch.clamp(s, min_value, max_value), as diffusers' schedulers use it);
    returns clip(x0, -s, s) / s in x0's dtype and layout.
    percentile is a fraction in [0, 1]; min_value > 0; max_value > 0 or None.
    """
    _check_tensor(x0, "x0", min_ndim=2)
    if x0.numel() == 0:
        raise ValueError(f"x0 must not be empty, got shape {tuple(x0.shape)}")
    p = check_percentile(percentile)
    m = check_float(min_value, "min_value", low=0.0, low_open=True)
    mx = math.inf if max_value is None else check_float(max_value, "max_value", low=0.0,
                                                           low_open=True)
    x0 = kernel_layout(x0)
    if _eager(x0) and not _wants_grad(x0):     # no autograd: a gradient must fail as the op's does
        return dispatch.resolve("dynamic_threshold", x0.device, x0)(x0, p, m, mx)
    return _dyn_thr(x0, p, m, mx)


# --------------------------------------------------------------------- sampler step
@torch.library.custom_op("imagen_fast::sampler_step", mutates_args=())
def _sampler_step(z_t: Tensor, pred_cond: Tensor, pred_uncond: Optional[Tensor],
                  guidance_scale: float, coefs: Tensor, noise: Optional[Tensor],
                  threshold: str, percentile: float, min_value: float) -> Tensor:
    fn = dispatch.resolve("sampler_step", z_t.device, z_t, pred_cond, pred_uncond, noise)
    return fn(z_t, pred_cond, pred_uncond, guidance_scale, coefs, noise, threshold,
              percentile, min_value)


@_sampler_step.register_fake
def _(z_t, pred_cond, pred_uncond, guidance_scale, coefs, noise, threshold, percentile,
      min_value):
    return torch.empty_like(z_t)


Number = Union[float, Tensor]


def _per_sample(value, name: str, n: int, device) -> Tensor:
    """A float or an (N,) tensor -> float64 (N,) on the CPU-side maths device."""
    if isinstance(value, Tensor):
        if value.ndim == 0:
            value = value.reshape(1)
        if value.ndim != 1 or value.shape[0] not in (1, n):
            raise ValueError(f"{name} must be a float or a tensor of shape (N,) = ({n},), "
                             f"got shape {tuple(value.shape)}")
        t = value.detach().to(device=device, dtype=torch.float64).expand(n)
    else:
        t = torch.full((n,), check_float(value, name), dtype=torch.float64, device=device)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    return t


def step_coefficients(alpha_t, sigma_t, alpha_s, sigma_s, *, sampler: str = "ddpm",
                      eta: float = 0.0, prediction: str = "eps") -> Tensor:
    """Per-sample coefficients (N, 5) = [a, b, c_x0, c_z, c_noise] of one step t -> s, from
    float64 tensors of shape (N,); the formulas: ``imagen_fast.core.step_coefficients``
    (one definition for the torch and JAX paths)."""
    return torch.stack(core_step_coefficients(alpha_t, sigma_t, alpha_s, sigma_s, sampler=sampler,
                                              eta=eta, prediction=prediction, xp=torch), dim=1)


_COEF_DTYPES = (torch.float32, torch.float64)


def _step_coefs(coefs, n: int, z_t: Tensor) -> Tensor:
    """The tensor path's coefficients: (5,) or (N, 5), float, on z_t's device -> (N, 5).
    Metadata checks only (no host read of the values: capture-safe)."""
    _check_tensor(coefs, "coefs", dtypes=_COEF_DTYPES)
    _check_same_device(z_t, coefs, "coefs", "z_t")
    cs = coefs.shape
    if cs == (n, 5):
        return coefs
    if cs != (5,):
        raise ValueError(f"coefs must have shape (5,) or (N, 5) = ({n}, 5), got {tuple(cs)}")
    return coefs.expand(n, 5)


def sampler_step(
    z_t: Tensor,
    pred_cond: Tensor,
    pred_uncond: Optional[Tensor] = None,
    *,
    guidance_scale: float = 1.0,
    alpha_t: Optional[Number] = None,
    sigma_t: Optional[Number] = None,
    alpha_s: Optional[Number] = None,
    sigma_s: Optional[Number] = None,
    sampler: Optional[str] = None,
    eta: Optional[float] = None,
    noise: Optional[Tensor] = None,
    threshold: str = "dynamic",
    percentile: float = 0.995,
    min_value: float = 1.0,
    prediction: Optional[str] = None,
    generator: Optional[torch.Generator] = None,
    coefs: Optional[Tensor] = None,
) -> Tensor:
    """One fused reverse-diffusion step t -> s with classifier-free guidance.

    pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
           (pred_cond alone when pred_uncond is None)
    x0   = a * z_t + b * pred                       (see step_coefficients)
    x0   = dynamic_threshold(x0) | clamp(x0, -1, 1) | x0   for threshold
           "dynamic" | "static" | "none"
    z_s  = c_x0 * x0 + c_z * z_t + c_noise * noise

    The step is given one of two ways:

    * times: alpha_t, sigma_t, alpha_s, sigma_s as floats or (N,) tensors (per-sample
      times), with ``sampler`` ("ddpm", ancestral, the default; "ddim" with ``eta``,
      0 = deterministic) and ``prediction`` ("eps" or "v"). The times are checked and the
      coefficients computed in float64 on the host; noise defaults to fresh standard
      normal noise (from ``generator``) when the step needs any.
    * ``coefs``: the step's [a, b, c_x0, c_z, c_noise] as a (5,) or (N, 5) float tensor on
      z_t's device, e.g. a row of ``imagen_fast.core.coefficient_table`` (which checks a
      whole run's grid once, on the host). Only the tensors' metadata is checked and no
      value is read on the host, so the call can run inside a CUDA graph or a
      torch.compile(fullgraph=True) region. ``noise`` is used as given; None means no
      noise term.

    The kernels make one pass to compute x0 and select the percentile and one pass
    to write z_s.
    """
    _check_tensor(z_t, "z_t", min_ndim=2)
    zshape, zdtype = z_t.shape, z_t.dtype
    if zshape.numel() == 0:
        raise ValueError(f"z_t must not be empty, got shape {tuple(zshape)}")
    zcpu = z_t.is_cpu
    for t, name in ((pred_cond, "pred_cond"), (pred_uncond, "pred_uncond"), (noise, "noise")):
        # z_t passed its checks: a plain tensor with its dtype, shape and (CPU) device passes
        # them too (the samplers' case, every step), anything else gets them one by one
        if t is None or (type(t) is Tensor and t.dtype is zdtype and t.shape == zshape and zcpu and t.is_cpu):
            continue
        _check_tensor(t, name)
        _check_same_device(z_t, t, name, "z_t")
        if t.shape != zshape:
            raise ValueError(f"{name} must have z_t's shape {tuple(zshape)}, got {tuple(t.shape)}")
        if t.dtype != zdtype:
            raise TypeError(f"{name} must have z_t's dtype {zdtype}, got {t.dtype}")
    w = check_float(guidance_scale, "guidance_scale")
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    p = check_percentile(percentile)
    m = check_float(min_value, "min_value", low=0.0, low_open=True)
    n = zshape[0]
    if coefs is not None:
        if not (alpha_t is None and sigma_t is None and alpha_s is None and sigma_s is None and sampler is None
                and eta is None and prediction is None and generator is None):
            given = [name for name, v in (("alpha_t", alpha_t), ("sigma_t", sigma_t), ("alpha_s", alpha_s),
                                          ("sigma_s", sigma_s), ("sampler", sampler), ("eta", eta),
                                          ("prediction", prediction), ("generator", generator))
                     if v is not None]
            raise ValueError(f"coefs holds the whole step: do not also give {', '.join(given)}")
        coefs = _step_coefs(coefs, n, z_t)
    else:
        times = (("alpha_t", alpha_t), ("sigma_t", sigma_t), ("alpha_s", alpha_s), ("sigma_s", sigma_s))
        missing = [name for name, v in times if v is None]
        if missing:
            raise TypeError(f"sampler_step needs alpha_t, sigma_t, alpha_s and sigma_s (or coefs); "
                            f"missing {', '.join(missing)}")
        eta = check_float(0.0 if eta is None else eta, "eta", low=0.0, high=1.0)
        sampler, prediction = sampler or "ddpm", prediction or "eps"
        if any(isinstance(v, Tensor) for _, v in times):
            per = [_per_sample(v, name, n, torch.device("cpu")) for name, v in times]
            coefs = step_coefficients(*per, sampler=sampler, eta=eta, prediction=prediction)
            with_noise, without_noise = bool((coefs[:, 4] != 0).any()), bool((coefs[:, 4] == 0).all())
        else:   # numbers (the samplers' case): the same formulas on floats, one small tensor
            row = core_step_coefficients(*(check_float(v, name) for name, v in times), sampler=sampler,
                                         eta=eta, prediction=prediction, xp=FLOATS)
            coefs = torch.frombuffer(array("d", row * n), dtype=torch.float64).view(n, 5)  # 2x torch.tensor's speed
            with_noise, without_noise = row[4] != 0, row[4] == 0
        if noise is None and with_noise:
            noise = torch.randn(z_t.shape, generator=generator, device=z_t.device, dtype=z_t.dtype)
        if noise is not None and without_noise:
            noise = None
        if not z_t.is_cpu:
            coefs = coefs.to(z_t.device)
    x = kernel_layout(z_t)
    xst = x.stride()     # the others have x's dtype: copied only when their strides differ
    pc = pred_cond if pred_cond.stride() == xst else like_layout(pred_cond, x)
    pu = pred_uncond if pred_uncond is None or pred_uncond.stride() == xst else like_layout(pred_uncond, x)
    nz = noise if noise is None or noise.stride() == xst else like_layout(noise, x)
    if _eager(x) and not _wants_grad(x, pc, pu, nz):     # no autograd: as the op's, a gradient fails
        fn = dispatch.resolve("sampler_step", x.device, x, pc, pu, nz)
        return fn(x, pc, pu, w, coefs, nz, threshold, p, m)
    return _sampler_step(x, pc, pu, w, coefs, nz, threshold, p, m)


__all__ = ["group_norm_silu", "channel_rms_norm_silu", "attention", "dynamic_threshold", "sampler_step",
           "step_coefficients", "is_channels_last"]
