"""Plain PyTorch definitions of every op: the ground truth for every backend.

Written for clarity, not speed. Every function works in float64, so tests compare a
kernel's output (in its own dtype) against these evaluated on float64 copies of the
same inputs. Argument checking lives in ``imagen_fast.ops.api``; these functions
assume valid arguments.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

def _apply_activation(y: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)  # exact erf form
    return y


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ...) for broadcasting against (N, C, *spatial)."""
    return t.reshape(1, -1, *([1] * (ndim - 2)))


def _per_sample_channel(t: Tensor, ndim: int) -> Tensor:
    """(N, C) -> (N, C, 1, ...)."""
    return t.reshape(t.shape[0], t.shape[1], *([1] * (ndim - 2)))


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
    """GroupNorm over (N, C, *spatial), affine, FiLM, activation.

    y = act(((x - mean_g) * rstd_g * weight + bias) * (1 + scale) + shift)
    with mean_g and the biased variance taken over each group's channels and all
    spatial positions, rstd_g = 1 / sqrt(var_g + eps); scale and shift are (N, C).
    """
    n, c = x.shape[:2]
    xg = x.reshape(n, num_groups, -1)
    mean = xg.mean(dim=-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        y = y * _per_channel(weight.to(y.dtype), x.ndim)
    if bias is not None:
        y = y + _per_channel(bias.to(y.dtype), x.ndim)
    if scale is not None:
        y = y * (1 + _per_sample_channel(scale.to(y.dtype), x.ndim))
    if shift is not None:
        y = y + _per_sample_channel(shift.to(y.dtype), x.ndim)
    return _apply_activation(y, activation or "none")


def group_norm_stats(x: Tensor, num_groups: int, eps: float = 1e-5):
    """(mean, rstd) per (sample, group), shape (N, G), in x's dtype."""
    xg = x.reshape(x.shape[0], num_groups, -1)
    mean = xg.mean(dim=-1)
    var = xg.var(dim=-1, unbiased=False)
    return mean, torch.rsqrt(var + eps)


def channel_rms_norm_silu(
    x: Tensor,
    weight: Optional[Tensor] = None,
    eps: float = 1e-12,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    activation: Optional[str] = "silu",
) -> Tensor:
    """RMS norm over the channel dim, per sample and position, then FiLM and activation.

    y = act(x / max(rms_c(x), eps) * weight * (1 + scale) + shift),
    rms_c(x) = sqrt(mean over channels of x^2), taken separately for every sample and
    spatial position. With eps bounding the RMS from below, imagen-pytorch's
    ChanRMSNorm (F.normalize(x, dim=1) * sqrt(C) * gamma) is this op with
    eps = 1e-12 / sqrt(C) (F.normalize bounds the L2 norm by 1e-12).
    """
    rms = x.pow(2).mean(dim=1, keepdim=True).sqrt()
    y = x / rms.clamp_min(eps)
    if weight is not None:
        y = y * _per_channel(weight.to(y.dtype), x.ndim)
    if scale is not None:
        y = y * (1 + _per_sample_channel(scale.to(y.dtype), x.ndim))
    if shift is not None:
        y = y + _per_sample_channel(shift.to(y.dtype), x.ndim)
    return _apply_activation(y, activation or "none")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """softmax(q k^T * scale, masked) v over (B, H, L, D) tensors.

    key_padding_mask is (B, Lk) bool, True = attend. A query whose keys are all masked
    gets an output of zeros (and so zero gradients), never NaN.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if key_padding_mask is None:
        return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v)
    keep = key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~keep, float("-inf"))
    any_key = keep.any(dim=-1, keepdim=True)
    # Rows with no key at all would be softmax(-inf...) = NaN: give them a finite row
    # and zero the result, so neither the output nor its gradient holds a NaN.
    scores = torch.where(any_key, scores, torch.zeros_like(scores))
    probs = scores.softmax(dim=-1) * any_key
    return torch.einsum("bhqk,bhkd->bhqd", probs, v)


def quantile_linear(values: Tensor, q: float) -> Tensor:
    """torch.quantile(values, q, dim=-1) with its default linear interpolation.

    Unlike torch.quantile it has no 2^24-element limit: it sorts and interpolates
    between the order statistics at floor and ceil of q * (n - 1), computing that
    rank in float64.
    """
    n = values.shape[-1]
    rank = q * (n - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    s = values.sort(dim=-1).values
    below, above = s[..., lo], s[..., hi]
    return below + (above - below) * frac


def dynamic_threshold(x0: Tensor, percentile: float = 0.995, min_value: float = 1.0,
                      max_value: float = math.inf) -> Tensor:
    """Imagen's dynamic thresholding, per sample.

    s = quantile(|x0|, percentile) over all non-batch dims (linear interpolation, as
    torch.quantile), s = clamp(s, min_value, max_value) (torch.clamp: max wins),
    return clamp(x0, -s, s) / s.
    """
    flat = x0.reshape(x0.shape[0], -1).abs()
    s = quantile_linear(flat, percentile).clamp(min=min_value).clamp(max=max_value)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def sampler_step(
    z_t: Tensor,
    pred_cond: Tensor,
    pred_uncond: Optional[Tensor],
    guidance_scale: float,
    coefs: Tensor,
    noise: Optional[Tensor],
    threshold: str,
    percentile: float,
    min_value: float,
) -> Tensor:
    """One reverse-diffusion step from per-sample coefficients (see ops.sampler_step).

    coefs is (N, 5) = [a, b, c_x0, c_z, c_noise]:
        pred = pred_uncond + w * (pred_cond - pred_uncond)   (pred_cond if no uncond)
        x0   = a * z_t + b * pred, then thresholded
        z_s  = c_x0 * x0 + c_z * z_t + c_noise * noise
    """
    pred = pred_cond if pred_uncond is None else pred_uncond + guidance_scale * (pred_cond - pred_uncond)
    shape = (-1,) + (1,) * (z_t.ndim - 1)
    a, b, c_x0, c_z, c_noise = (coefs[:, i].to(z_t.dtype).reshape(shape) for i in range(5))
    x0 = a * z_t + b * pred
    if threshold == "dynamic":
        x0 = dynamic_threshold(x0, percentile, min_value)
    elif threshold == "static":
        x0 = x0.clamp(-1.0, 1.0)
    z_s = c_x0 * x0 + c_z * z_t
    if noise is not None:
        z_s = z_s + c_noise * noise
    return z_s
