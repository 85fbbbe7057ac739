"""Backend "cuda": the CUDA C++ kernels of csrc/cuda, through imagen_fast._C.

Tensors cross as data pointers and shapes, with the current torch CUDA stream, so the
kernels order with the rest of the caller's work. Scratch memory comes from torch (the
caching allocator), never from cudaMalloc in C++. The module raises ImportError (and
the backend is reported unavailable) when _C was built without CUDA.

The functions below follow the exact contract of ``_torch_backend``'s functions of the
same names (inputs, outputs, dtypes, layouts).

Test and tuning switches (read at every call):
  IMAGEN_FAST_CUDA_GN_PATH          auto | onepass | split  (group_norm_silu path)
  IMAGEN_FAST_CUDA_GN_CHUNKS        split path: CTAs along the spatial axis (0 = auto)
  IMAGEN_FAST_CUDA_THRESHOLD_CTAS   radix select: CTAs per sample (0 = auto)
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Tuple

import torch

from .._compiled import load_extension
from .layout import ACTIVATION_CODES, DTYPE_CODES, THRESHOLD_CODES, is_channels_last, kernel_layout
from .layout import like_layout as _like
from .layout import stats_dtype as _stat_dtype
from .registry import register

_C = load_extension()
if _C is None or not _C.HAS_CUDA:
    raise ImportError("imagen_fast._C was built without CUDA (no nvcc at build time, "
                      "or IMAGEN_FAST_CUDA=0)")

# Tests swap in the host-emulated build of the same kernels (tests/ops/test_cuda_kernels.py)
# and set this, so the functions below accept CPU tensors; never set otherwise.
_EMULATED = False

GN_PATHS = {"auto": 0, "onepass": 1, "split": 2}


# ------------------------------------------------------------------ helpers
def _env_int(name: str) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a non-negative integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {raw!r}")
    return value


def _gn_path() -> int:
    raw = os.environ.get("IMAGEN_FAST_CUDA_GN_PATH", "auto").strip().lower() or "auto"
    if raw not in GN_PATHS:
        raise ValueError(f"IMAGEN_FAST_CUDA_GN_PATH must be one of {tuple(GN_PATHS)}, got {raw!r}")
    return GN_PATHS[raw]


@functools.lru_cache(maxsize=None)
def _capability_ok(index: int) -> Optional[str]:
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return (f"backend 'cuda' is built for compute capability >= 8.0 (sm_80, sm_90a); "
                f"cuda:{index} is {major}.{minor}")
    return None


def _supports(*tensors) -> Optional[str]:
    """None when the kernels can run on these tensors, else why not."""
    ref = tensors[0]
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got {t.device.type}"
        if t.device != ref.device:
            return f"tensors on different devices ({ref.device}, {t.device})"
        if t.dtype not in DTYPE_CODES:
            return f"dtype {t.dtype} is not supported"
    if ref.numel() == 0:
        return "empty input"
    return _capability_ok(ref.device.index)


def _require_cuda(t: torch.Tensor, name: str) -> None:
    """Direct calls (bypassing dispatch) still get a clear error, never a bad pointer."""
    if _EMULATED and isinstance(t, torch.Tensor) and t.device.type == "cpu":
        return
    if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
        where = t.device if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"backend 'cuda': {name} must be a CUDA tensor, got {where}")


def _dense(x: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """x as (N, C, S) contiguous or (N, S, C) channels-last; returns (x, channels_last)."""
    x = kernel_layout(x)
    return x, is_channels_last(x)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _param(t: Optional[torch.Tensor], dtype: torch.dtype, device) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t.to(device=device, dtype=dtype).contiguous()


def _common(x: torch.Tensor) -> dict:
    stream = torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0
    return dict(device=x.device.index or 0, stream=stream, dtype=DTYPE_CODES[x.dtype])


def _workspace(nbytes: int, device) -> Optional[torch.Tensor]:
    # Freed right after the launches: the caching allocator only hands the block out
    # again in stream order, after these kernels.
    return torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None


def _gn_args(x, num_groups, weight, bias, scale, shift, activation, eps=1e-5) -> dict:
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    x, cl = _dense(x)
    sdt = _stat_dtype(x)
    args = _common(x)
    args.update(N=n, C=c, S=s, G=num_groups, channels_last=cl, eps=float(eps),
                activation=ACTIVATION_CODES[activation or "none"],
                force_path=_gn_path(), force_chunks=_env_int("IMAGEN_FAST_CUDA_GN_CHUNKS"))
    keep = {}
    for name, t in (("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift)):
        t = _param(t, sdt, x.device)
        keep[name] = t
        args[name] = _ptr(t)
    return args, x, keep


def _run(plan_fn, run_fn, args: dict, device, plan_flag: bool) -> dict:
    plan = plan_fn(args, plan_flag)
    ws = _workspace(plan["workspace_bytes"], device)
    args["workspace"] = _ptr(ws)
    args["workspace_bytes"] = plan["workspace_bytes"]
    run_fn(args)
    return plan


# ----------------------------------------------------------------- group_norm_silu
def group_norm_plan(x, num_groups, *, backward=False, activation="silu") -> dict:
    """The plan ({'path': 'onepass'|'split', ...}) the kernels would use for x."""
    _require_cuda(x, "x")
    args, x, _ = _gn_args(x, num_groups, None, None, None, None, activation)
    args.update(x=x.data_ptr(), y=x.data_ptr(), grad_y=x.data_ptr(), grad_x=x.data_ptr(),
                mean=x.data_ptr(), rstd=x.data_ptr())
    if backward:
        args.pop("y")
    return _C.cuda_group_norm_plan(args, backward)


@register("group_norm_silu_fwd", "cuda", supports=_supports)
def group_norm_silu_fwd(x, num_groups, weight, bias, eps, scale, shift, activation):
    _require_cuda(x, "x")
    args, x, _keep = _gn_args(x, num_groups, weight, bias, scale, shift, activation, eps)
    sdt = _stat_dtype(x)
    y = torch.empty_like(x)
    mean = torch.empty((x.shape[0], num_groups), dtype=sdt, device=x.device)
    rstd = torch.empty_like(mean)
    args.update(x=x.data_ptr(), y=y.data_ptr(), mean=mean.data_ptr(), rstd=rstd.data_ptr())
    _run(_C.cuda_group_norm_plan, _C.cuda_group_norm_forward, args, x.device, False)
    return y, mean, rstd


@register("group_norm_silu_bwd", "cuda", supports=_supports)
def group_norm_silu_bwd(grad_y, x, mean, rstd, num_groups, weight, bias, scale, shift,
                        activation, needs):
    _require_cuda(x, "x")
    _require_cuda(grad_y, "grad_y")
    needs = tuple(bool(v) for v in needs)
    params = (weight, bias, scale, shift)
    want = [needs[0]] + [need and p is not None for need, p in zip(needs[1:], params)]
    if not any(want):
        return (None,) * 5
    args, x, keep = _gn_args(x, num_groups, weight, bias, scale, shift, activation)
    sdt = _stat_dtype(x)
    gy = _like(grad_y, x)
    mean = mean.to(sdt).contiguous()
    rstd = rstd.to(sdt).contiguous()
    gx = torch.empty_like(x) if want[0] else None
    grads = [torch.empty_like(keep[name]) if w else None
             for name, w in zip(("weight", "bias", "scale", "shift"), want[1:])]
    args.update(x=x.data_ptr(), grad_y=gy.data_ptr(), mean=mean.data_ptr(),
                rstd=rstd.data_ptr(), grad_x=_ptr(gx), grad_weight=_ptr(grads[0]),
                grad_bias=_ptr(grads[1]), grad_scale=_ptr(grads[2]), grad_shift=_ptr(grads[3]))
    _run(_C.cuda_group_norm_plan, _C.cuda_group_norm_backward, args, x.device, True)
    return (gx, *grads)


# ------------------------------------------------------------ dynamic thresholding
def _thr_args(x, percentile, min_value, max_value=math.inf) -> dict:
    n = x.shape[0]
    args = _common(x)
    args.update(N=n, L=x.numel() // n, percentile=float(percentile),
                min_value=float(min_value), max_value=float(max_value),
                force_ctas_per_sample=_env_int("IMAGEN_FAST_CUDA_THRESHOLD_CTAS"))
    return args


def threshold_values(x0, percentile, min_value=1.0, max_value=math.inf):
    """(y, s): dynamic_threshold's output and the per-sample thresholds s (float64)."""
    _require_cuda(x0, "x0")
    x, _ = _dense(x0)
    out = torch.empty_like(x)
    s = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    args = _thr_args(x, percentile, min_value, max_value)
    args.update(x=x.data_ptr(), out=out.data_ptr(), s_out=s.data_ptr())
    _run(_C.cuda_threshold_plan, _C.cuda_dynamic_threshold, args, x.device, False)
    return out, s


@register("dynamic_threshold", "cuda", supports=_supports)
def dynamic_threshold(x0, percentile, min_value, max_value=math.inf):
    return threshold_values(x0, percentile, min_value, max_value)[0]


@register("sampler_step", "cuda", supports=_supports)
def sampler_step(z_t, pred_cond, pred_uncond, guidance_scale, coefs, noise, threshold,
                 percentile, min_value):
    _require_cuda(z_t, "z_t")
    z, _ = _dense(z_t)
    cond = _like(pred_cond, z)
    uncond = None if pred_uncond is None else _like(pred_uncond, z)
    eps = None if noise is None else _like(noise, z)
    coefs = coefs.to(device=z.device, dtype=torch.float64).contiguous()
    if tuple(coefs.shape) != (z.shape[0], 5):
        raise ValueError(f"coefs must have shape (N, 5) = ({z.shape[0]}, 5), got {tuple(coefs.shape)}")
    out = torch.empty_like(z)
    args = _thr_args(z, percentile, min_value)
    args.update(z=z.data_ptr(), cond=cond.data_ptr(), uncond=_ptr(uncond), noise=_ptr(eps),
                coefs=coefs.data_ptr(), guidance=float(guidance_scale),
                threshold=THRESHOLD_CODES[threshold], out=out.data_ptr())
    _run(_C.cuda_threshold_plan, _C.cuda_sampler_step, args, z.device, True)
    return out
