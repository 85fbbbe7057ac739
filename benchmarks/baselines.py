"""The stock-PyTorch baselines every op benchmark compares against (CPU and GPU alike)."""
from __future__ import annotations

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
