"""Backend "torch": the reference maths on any device, with explicit backward passes.

This is what runs where no kernel covers a case. Its backward passes are written
out (not autograd through the reference) so they are a second, independent
derivation that the tests check against autograd.
"""
from __future__ import annotations

import math

import torch

from ..kernels.layout import like_layout, stats_dtype
from ..kernels.registry import register
from . import reference


def _normalized(x, num_groups, mean, rstd):
    """x_hat in the statistics dtype, shaped like x."""
    n = x.shape[0]
    xg = x.to(mean.dtype).reshape(n, num_groups, -1)
    return ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)


def _affine_film(x_hat, weight, bias, scale, shift):
    """(pre-activation h, the per-(n, c) multiplier m applied to x_hat)."""
    nd = x_hat.ndim
    dt = x_hat.dtype
    w = weight.to(dt).reshape(1, -1, *([1] * (nd - 2))) if weight is not None else None
    b = bias.to(dt).reshape(1, -1, *([1] * (nd - 2))) if bias is not None else None
    s = (1 + scale.to(dt)).reshape(*scale.shape, *([1] * (nd - 2))) if scale is not None else None
    sh = shift.to(dt).reshape(*shift.shape, *([1] * (nd - 2))) if shift is not None else None
    h = x_hat
    if w is not None:
        h = h * w
    if b is not None:
        h = h + b
    if s is not None:
        h = h * s
    if sh is not None:
        h = h + sh
    return h


@register("group_norm_silu_fwd", "torch")
def group_norm_silu_fwd(x, num_groups, weight, bias, eps, scale, shift, activation):
    sdt = stats_dtype(x)
    mean, rstd = reference.group_norm_stats(x.to(sdt), num_groups, eps)
    h = _affine_film(_normalized(x, num_groups, mean, rstd), weight, bias, scale, shift)
    y = reference._apply_activation(h, activation)
    return like_layout(y, x), mean, rstd


def activation_grad(h: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(h) / dh."""
    if activation == "silu":
        sig = torch.sigmoid(h)
        return sig * (1 + h * (1 - sig))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(h / math.sqrt(2)))
        pdf = torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
        return cdf + h * pdf
    return torch.ones_like(h)


@register("group_norm_silu_bwd", "torch")
def group_norm_silu_bwd(grad_y, x, mean, rstd, num_groups, weight, bias, scale, shift,
                        activation, needs):
    sdt = mean.dtype
    n, c = x.shape[:2]
    nd = x.ndim
    x_hat = _normalized(x, num_groups, mean, rstd)
    h = _affine_film(x_hat, weight, bias, scale, shift)
    dh = grad_y.to(sdt) * activation_grad(h, activation)            # dL/dh
    spatial = tuple(range(2, nd))
    film = (1 + scale.to(sdt)) if scale is not None else None         # (N, C)
    # h = (x_hat * w + b) * film + shift
    g_shift = dh.sum(dim=spatial) if shift is not None else None
    a = x_hat
    if weight is not None:
        a = a * weight.to(sdt).reshape(1, c, *([1] * (nd - 2)))
    if bias is not None:
        a = a + bias.to(sdt).reshape(1, c, *([1] * (nd - 2)))
    g_scale = (dh * a).sum(dim=spatial) if scale is not None else None
    da = dh * film.reshape(n, c, *([1] * (nd - 2))) if film is not None else dh   # dL/da
    g_bias = da.sum(dim=(0,) + spatial) if bias is not None else None
    g_weight = (da * x_hat).sum(dim=(0,) + spatial) if weight is not None else None
    g_x = None
    if needs[0]:
        dxh = da * weight.to(sdt).reshape(1, c, *([1] * (nd - 2))) if weight is not None else da
        dxh_g = dxh.reshape(n, num_groups, -1)
        xh_g = x_hat.reshape(n, num_groups, -1)
        g_x = rstd[..., None] * (dxh_g - dxh_g.mean(-1, keepdim=True)
                                 - xh_g * (dxh_g * xh_g).mean(-1, keepdim=True))
        g_x = like_layout(g_x.reshape(x.shape), x)
    grads = (g_weight, g_bias, g_scale, g_shift)
    params = (weight, bias, scale, shift)
    return (g_x,) + tuple(g.to(p.dtype) if g is not None and need else None
                          for g, p, need in zip(grads, params, needs[1:]))


def _rms_coefs(x, rstd, weight, scale, shift):
    """x_hat = x * rstd and the pre-activation h = x_hat * w * (1 + s) + shift."""
    sdt = rstd.dtype
    x_hat = x.to(sdt) * rstd.reshape(x.shape[0], 1, *x.shape[2:])
    return x_hat, _affine_film(x_hat, weight, None, scale, shift)


def rms_clamped(rstd: torch.Tensor, eps: float) -> torch.Tensor:
    """Where the RMS was below eps (rstd = 1 / eps): the norm is a constant scale there."""
    return rstd >= 1.0 / torch.tensor(eps, dtype=rstd.dtype)


@register("channel_rms_norm_silu_fwd", "torch")
def channel_rms_norm_silu_fwd(x, weight, eps, scale, shift, activation):
    sdt = stats_dtype(x)
    rms = x.to(sdt).pow(2).mean(dim=1).sqrt()
    rstd = 1.0 / rms.clamp_min(eps)
    _, h = _rms_coefs(x, rstd, weight, scale, shift)
    y = reference._apply_activation(h, activation)
    return like_layout(y, x), rstd.reshape(x.shape[0], -1).contiguous()


@register("channel_rms_norm_silu_bwd", "torch")
def channel_rms_norm_silu_bwd(grad_y, x, rstd, weight, eps, scale, shift, activation, needs):
    sdt = rstd.dtype
    n, c = x.shape[:2]
    nd = x.ndim
    rstd = rstd.reshape(n, 1, *x.shape[2:])
    x_hat, h = _rms_coefs(x, rstd, weight, scale, shift)
    dh = grad_y.to(sdt) * activation_grad(h, activation)              # dL/dh
    spatial = tuple(range(2, nd))
    per_c = (1, c) + (1,) * (nd - 2)
    w = weight.to(sdt).reshape(per_c) if weight is not None else None
    # h = x_hat * w * film + shift
    g_shift = dh.sum(dim=spatial) if shift is not None else None
    g_scale = (dh * (x_hat * w if w is not None else x_hat)).sum(dim=spatial) if scale is not None else None
    da = dh * (1 + scale.to(sdt)).reshape(n, c, *([1] * (nd - 2))) if scale is not None else dh
    g_weight = (da * x_hat).sum(dim=(0,) + spatial) if weight is not None else None
    g_x = None
    if needs[0]:
        dxh = da * w if w is not None else da
        # x_hat = x / rms: d/dx = rstd (dxh - x_hat mean_c(dxh x_hat)); a clamped RMS is
        # a constant, which leaves rstd dxh.
        proj = (dxh * x_hat).mean(dim=1, keepdim=True)
        proj = torch.where(rms_clamped(rstd, eps), torch.zeros_like(proj), proj)
        g_x = rstd * (dxh - x_hat * proj)
        g_x = like_layout(g_x, x)
    grads = (g_weight, g_scale, g_shift)
    params = (weight, scale, shift)
    return (g_x,) + tuple(g.to(p.dtype) if g is not None and need else None
                          for g, p, need in zip(grads, params, needs[1:]))


def _scores(q, k, scale, mask):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return s


@register("attention_fwd", "torch")
def attention_fwd(q, k, v, mask, scale):
    cdt = stats_dtype(q)
    s = _scores(q.to(cdt), k.to(cdt), scale, mask)
    lse = torch.logsumexp(s, dim=-1)                                   # -inf on empty rows
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhqk,bhkd->bhqd", p, v.to(cdt))
    return out.to(q.dtype), lse.float()


@register("attention_bwd", "torch")
def attention_bwd(grad_out, q, k, v, mask, out, lse, scale):
    cdt = stats_dtype(q)
    q32, k32, v32, do = q.to(cdt), k.to(cdt), v.to(cdt), grad_out.to(cdt)
    s = _scores(q32, k32, scale, mask)
    # The saved lse is float32 by contract: float64 gradients recompute it in float64.
    lse = torch.logsumexp(s, dim=-1) if cdt == torch.float64 else lse.to(cdt)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])  # rows of zeros when empty
    dv = torch.einsum("bhqk,bhqd->bhkd", p, do)
    dp = torch.einsum("bhqd,bhkd->bhqk", do, v32)
    delta = (do * out.to(cdt)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.einsum("bhqk,bhkd->bhqd", ds, k32) * scale
    dk = torch.einsum("bhqk,bhqd->bhkd", ds, q32) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@register("dynamic_threshold", "torch")
def dynamic_threshold(x0, percentile, min_value, max_value=math.inf):
    cdt = stats_dtype(x0)
    return reference.dynamic_threshold(x0.to(cdt), percentile, min_value, max_value).to(x0.dtype)


@register("sampler_step", "torch")
def sampler_step(z_t, pred_cond, pred_uncond, guidance_scale, coefs, noise, threshold,
                 percentile, min_value):
    cdt = stats_dtype(z_t)
    up = lambda t: None if t is None else t.to(cdt)  # noqa: E731
    out = reference.sampler_step(up(z_t), up(pred_cond), up(pred_uncond), guidance_scale,
                                 coefs, up(noise), threshold, percentile, min_value)
    return out.to(z_t.dtype)

