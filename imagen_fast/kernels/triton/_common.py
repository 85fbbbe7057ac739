"""Shared pieces of the Triton backend: device facts, what the kernels take, launch-config
tuning, maths.

Tuning. ``pick_config`` chooses a launch configuration per *shape class* (a small
tuple of buckets, never the raw shape, so a new image size does not re-tune) and
per device. On a GPU it times the candidates once with ``triton.testing.do_bench``
and caches the winner for the process; a candidate that fails to launch is skipped.
Every candidate list is compiled ahead of time for sm_80 and sm_90 by
benchmarks/gpu_compile.py (its CI subset in tests/ops/test_gpu_compile.py): every
candidate compiles and fits the card's shared memory, and the first of each list,
the default, does not spill registers. Under
TRITON_INTERPRET=1, during CUDA graph capture, or with IMAGEN_FAST_TRITON_AUTOTUNE=0
no timing happens and the given default is used (a choice tuned earlier in the process
is still used while capturing: torch.compile's cudagraph trees run a step once before
they capture it, so the graph gets the tuned configuration).

Capture safety. Everything a launch needs is computed on the host from shapes, dtypes
and Python scalars, or made on the device by torch (``device_scalars``): no value is
read back from the GPU, nothing is copied from host memory, every kernel goes on torch's
current stream (Triton's launcher asks torch for it) and scratch memory comes from
torch's allocator. tests/ops/test_capture_safety.py checks this.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from typing import Any, Callable, Dict, Hashable, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..layout import is_channels_last, stats_dtype

log = logging.getLogger("imagen_fast")

# Pretend SM count under the interpreter: small, so that tiny test shapes take the
# split-reduction paths that big GPUs take at real shapes.
INTERPRETER_SM_COUNT = 4


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def device_key(device: torch.device) -> Tuple:
    if device.type != "cuda":
        return ("interpreter",)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    return (props.name, props.major, props.minor)


def bucket(n: int) -> int:
    """log2 bucket of a size: the unit of a shape class."""
    return max(0, int(n)).bit_length()


def dtype_supported(dt: torch.dtype) -> bool:
    return dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_device(*tensors) -> str | None:
    """None when every tensor is on a device the triton backend can run on."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        return f"triton needs CUDA tensors (or TRITON_INTERPRET=1), got {t.device.type}"
    return None


def geometry(x: torch.Tensor):
    """(N, C, S, channels_last) of an image tensor (N, C, *spatial)."""
    n, c = x.shape[:2]
    s = x.numel() // (n * c) if x.numel() else 0
    return n, c, s, is_channels_last(x)


def compute_dtype(x: torch.Tensor):
    """The Triton dtype kernels compute in for input x (layout.stats_dtype's rule)."""
    return tl.float64 if stats_dtype(x) == torch.float64 else tl.float32


def norm_supports(x, *_args) -> str | None:
    """Whether the norm kernels (group_norm, rms_norm) can take x, as dispatch asks."""
    why = check_device(x)
    if why:
        return why
    if not dtype_supported(x.dtype):
        return f"dtype {x.dtype} not supported"
    if x.ndim < 2:
        return "x must have at least 2 dims"
    if x.shape[0] and x.numel() // x.shape[0] >= 2 ** 31:
        return "more than 2^31 elements per sample"
    if not (x.is_contiguous() or is_channels_last(x)):
        return "x must be contiguous or channels-last"
    return None


_tuned: Dict[Hashable, Any] = {}


def autotune_enabled(device: torch.device) -> bool:
    if device.type != "cuda" or interpreting():
        return False
    if os.environ.get("IMAGEN_FAST_TRITON_AUTOTUNE", "1").strip() in ("0", "false", "no"):
        return False
    try:
        if torch.cuda.is_current_stream_capturing():
            return False
    except Exception:  # pragma: no cover - very old torch
        pass
    return True


def pick_config(name: str, key: Hashable, device: torch.device, candidates: Sequence[Any],
                run: Callable[[Any], None], default: Any) -> Any:
    """The launch config for (name, shape class key, device).

    ``run(cfg)`` launches the op with ``cfg`` (it must only overwrite its outputs,
    so timing it repeatedly is harmless).
    """
    full = (name, key, device_key(device))
    if full in _tuned:             # also while capturing: the graph replays what was tuned
        return _tuned[full]
    if not autotune_enabled(device):
        return default
    best, best_ms = None, math.inf
    for cfg in candidates:
        try:
            run(cfg)
            torch.cuda.synchronize(device)
            ms = triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=25,
                                         return_mode="median")
        except Exception as e:  # out of resources on this card, etc.
            log.debug("imagen_fast triton %s: config %s skipped (%s)", name, cfg, e)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        best = default
    _tuned[full] = best
    log.debug("imagen_fast triton %s %s: picked %s (%.4f ms)", name, key, best, best_ms)
    return best


def device_scalars(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of host scalars, written on the device by fill kernels (the values
    are kernel arguments): no host-to-device copy, so it can be captured in a CUDA graph
    (torch.tensor(values, device=...) copies from pageable host memory, which a capture
    refuses)."""
    out = torch.empty(len(values), dtype=dtype, device=device)
    for i, v in enumerate(values):
        out[i].fill_(float(v))
    return out


# ------------------------------------------------------------------- device maths
# Written with tl.exp only: libdevice calls do not run under the interpreter.
LOG2E = 1.4426950408889634

@triton.jit
def sigmoid(h):
    return 1.0 / (1.0 + tl.exp(-h))


@triton.jit
def erfc_abs(z):
    """erfc(|z|) with relative error < 1.2e-7 everywhere (Chebyshev fit of
    exp(z^2) erfc(z); Numerical Recipes' erfcc). No cancellation for large |z|."""
    a = tl.abs(z)
    t = 1.0 / (1.0 + 0.5 * a)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    return t * tl.exp(-a * a + poly)


@triton.jit
def normal_cdf(h):
    """Phi(h) = (1 + erf(h / sqrt 2)) / 2. float32: from erfc, so accurate in relative
    terms for h < 0 too; float64: tl.math.erf (exact to float64, as the reference)."""
    if h.dtype == tl.float64:
        return 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    else:
        e = 0.5 * erfc_abs(h * 0.7071067811865476)
        return tl.where(h < 0, e, 1.0 - e)


@triton.jit
def activation(h, ACT: tl.constexpr):
    if ACT == 1:
        return h * sigmoid(h)
    elif ACT == 2:
        return h * normal_cdf(h)
    else:
        return h


@triton.jit
def activation_grad(h, ACT: tl.constexpr):
    """d act(h) / dh."""
    if ACT == 1:
        sg = sigmoid(h)
        return sg * (1.0 + h * (1.0 - sg))
    elif ACT == 2:
        return normal_cdf(h) + h * (tl.exp(-0.5 * h * h) * 0.3989422804014327)
    else:
        return tl.full(h.shape, 1.0, h.dtype)


@contextlib.contextmanager
def forced(table: dict, **fields):
    """Test hook: override entries of a module's launch-plan table inside the block."""
    saved = dict(table)
    table.update({k: v for k, v in fields.items() if v is not None})
    try:
        yield
    finally:
        table.clear()
        table.update(saved)
