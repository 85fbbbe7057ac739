"""Memory-layout and dtype rules that every backend shares (a leaf: imports torch only).

Kernels read images in two layouts: contiguous (N, C, *spatial) and channels-last
((N, *spatial, C) in memory). Outputs and gradients keep x's layout and dtype;
statistics, parameters and accumulators are float32 (float64 for float64 inputs).
The integer codes are the C++ kernels' ABI.
"""
from __future__ import annotations

import torch

# Must match csrc/include/imagen_fast/common.h (DType, Activation) and the threshold
# codes of csrc/cpu/threshold.cpp and csrc/cuda/threshold.cu.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
ACTIVATION_CODES = {"none": 0, "silu": 1, "gelu": 2}
THRESHOLD_CODES = {"none": 0, "static": 1, "dynamic": 2}


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x is dense with channels innermost ((N, *spatial, C) in memory) and not
    also plain contiguous."""
    if x.ndim < 3 or x.is_contiguous():
        return False
    perm = (0,) + tuple(range(2, x.ndim)) + (1,)
    return x.permute(perm).is_contiguous()


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself when contiguous or channels-last, else a contiguous copy."""
    if x.is_contiguous() or is_channels_last(x):
        return x
    return x.contiguous()


def like_layout(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t with x's dtype and exact strides (x in a kernel layout), copied only when either
    differs. torch.empty_like keeps the strides of a dense tensor."""
    if t.dtype == x.dtype and t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of statistics, parameters and accumulators for input x."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
