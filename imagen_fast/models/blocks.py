"""Convolutional building blocks: GroupNorm(+FiLM)(+SiLU) and residual blocks.

All normalisation goes through ``imagen_fast.ops.group_norm_silu`` so the fused
kernels (GroupNorm + FiLM + SiLU in one pass) run wherever a backend has them.
Tensors stay channels_last: the convolutions keep the layout they are given and the
op returns its input's layout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: residual branches then start as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def pick_groups(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` not above ``groups``."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class GroupNormAct(nn.Module):
    """GroupNorm with affine weight/bias, optional FiLM and activation (one fused op)."""

    def __init__(self, channels: int, groups: int = 32, activation: Optional[str] = "silu",
                 eps: float = 1e-5):
        super().__init__()
        self.num_groups = pick_groups(channels, groups)
        self.activation = activation
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, scale: Optional[Tensor] = None,
                shift: Optional[Tensor] = None) -> Tensor:
        return ops.group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps,
                                   scale, shift, self.activation)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, groups={self.num_groups}, activation={self.activation}"


def downsample(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 2)


def upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class ResBlock(nn.Module):
    """Residual block with FiLM conditioning (scale-shift norm).

        h = conv3x3(SiLU(GN(x)))                  (BigGAN: resample between act and conv)
        h = conv3x3(SiLU(GN(h) * (1 + scale) + shift)),  (scale, shift) = Linear(SiLU(emb))
        out = skip(x) + h                          skip = identity or 1x1 conv

    ``resample`` "down" (2x average pool) or "up" (2x nearest) is applied inside the
    block to both paths, as in BigGAN/ADM; the Efficient U-Net resamples outside.
    The last convolution starts at zero, so a fresh block is the identity (or the
    skip projection).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int = 32,
                 resample: Optional[str] = None, dropout: float = 0.0):
        super().__init__()
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample must be None, 'down' or 'up', got {resample!r}")
        self.resample = resample
        self.norm1 = GroupNormAct(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = GroupNormAct(out_channels, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return downsample(x)
        if self.resample == "up":
            return upsample(x)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.norm1(x)
        h = self.conv1(self._resample(h))
        x = self._resample(x)
        scale, shift = self.emb_proj(F.silu(emb)).chunk(2, dim=1)
        h = self.norm2(h, scale, shift)
        h = self.conv2(self.dropout(h))
        # in place: conv2's output is not saved for backward, so this is autograd-safe
        return h.add_(self.skip(x))
