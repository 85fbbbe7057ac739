"""The stock-PyTorch baselines every op benchmark compares against (CPU and GPU alike)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from imagen_fast import ops


def eager_group_norm(x, g, w, b, s, sh):
    """F.group_norm, then the FiLM, then F.silu: what a U-Net block does without fusion."""
    y = F.group_norm(x, g, w, b)
    return F.silu(y * (1 + s[:, :, None, None]) + sh[:, :, None, None])


def eager_chan_rms_norm(x, w, s=None, sh=None):
    """imagen-pytorch's ChanRMSNorm (F.normalize over channels * sqrt(C) * gamma), then the
    FiLM and F.silu: what imagen_fast.accelerate replaces with one channel_rms_norm_silu."""
    c = x.shape[1]
    y = F.normalize(x, dim=1) * c ** 0.5 * w[:, None, None]
    if s is not None:
        y = y * (1 + s[:, :, None, None]) + sh[:, :, None, None]
    return F.silu(y)


def quantile_threshold(x0, p=0.995):
    """Dynamic thresholding with torch.quantile (refuses more than 2^24 elements)."""
    s = torch.quantile(x0.abs().reshape(x0.shape[0], -1).float(), p, dim=1).clamp(min=1.0)
    s = s.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return torch.maximum(torch.minimum(x0, s), -s) / s


# The step every sampler benchmark times: t -> s with these alphas and sigmas, guidance 5.
STEP = dict(guidance_scale=5.0, alpha_t=0.6, sigma_t=0.8, alpha_s=0.8, sigma_s=0.6)


def eager_sampler_step():
    """The guided DDPM step of STEP as separate PyTorch ops (noise given)."""
    k = ops.step_coefficients(*(torch.full((1,), STEP[v], dtype=torch.float64)
                                for v in ("alpha_t", "sigma_t", "alpha_s", "sigma_s")))[0].tolist()
    w = STEP["guidance_scale"]

    def step(z, cond, uncond, noise):
        pred = uncond + w * (cond - uncond)
        x0 = quantile_threshold(k[0] * z + k[1] * pred)
        return k[2] * x0 + k[3] * z + k[4] * noise
    return step


# ------------------------------------------------- the model on plain PyTorch ops
_ACT = {"silu": F.silu, "gelu": F.gelu, "none": None, None: None}


def plain_group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, scale=None, shift=None,
                          activation="silu"):
    """ops.group_norm_silu's signature on F.group_norm + FiLM + the activation, unfused."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    n, c = x.shape[:2]
    tail = (1,) * (x.ndim - 2)
    if scale is not None:
        y = y * (1 + scale.reshape(n, c, *tail))
    if shift is not None:
        y = y + shift.reshape(n, c, *tail)
    act = _ACT[activation]
    return y if act is None else act(y)


def plain_attention(q, k, v, key_padding_mask=None, scale=None):
    """ops.attention's signature on F.scaled_dot_product_attention with the boolean mask
    (torch >= 2.5 gives a fully masked query zeros, as ops.attention does)."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@contextlib.contextmanager
def plain_ops():
    """Inside the block imagen_fast's models run on plain PyTorch ops: they call
    ``imagen_fast.ops.group_norm_silu`` / ``.attention`` through the package attribute."""
    names = {"group_norm_silu": plain_group_norm_silu, "attention": plain_attention}
    saved = {k: getattr(ops, k) for k in names}
    for k, f in names.items():
        setattr(ops, k, f)
    try:
        yield
    finally:
        for k, f in saved.items():
            setattr(ops, k, f)
