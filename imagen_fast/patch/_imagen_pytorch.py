"""imagen-pytorch: its Unet's blocks and attention, and Imagen's dynamic thresholding.

Replaced:
* Block (ChanRMSNorm -> optional time scale/shift -> SiLU -> conv): the first three are
  one ops.channel_rms_norm_silu. ChanRMSNorm is F.normalize(x, dim=1) * sqrt(C) *
  gamma, i.e. x / max(rms, 1e-12 / sqrt(C)) * gamma. A ChanRMSNorm outside a Block
  becomes the same op without activation.
* Attention (cosine-similarity multi-query attention with a null key/value and the
  text tokens concatenated to the keys): ops.attention with scale = its fixed scale.
  The one key/value head is shared by every query head, so the heads are folded into
  the query length (one head of H * N queries) instead of copying keys H times.
* CrossAttention (per-head cosine-similarity attention over null + text keys, with
  an optional text mask): ops.attention with the mask as key padding mask.
* Imagen.p_mean_variance's dynamic thresholding (torch.quantile) and
  ElucidatedImagen.threshold_x_start: ops.dynamic_threshold, overridden on the
  instance. For Imagen the scheduler handed to p_mean_variance is wrapped so that
  its x0 prediction comes back thresholded; the original's clamp to [-1, 1] is then
  a no-op. The "x_start" objective (x0 predicted directly, not through the
  scheduler) keeps the original path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from imagen_pytorch.imagen_pytorch import Attention, Block, ChanRMSNorm, CrossAttention, Imagen
from torch import nn

from .. import ops
from ._core import PatchReport, Rule, fast_method, overridden_methods, override_method

try:
    from imagen_pytorch.elucidated_imagen import ElucidatedImagen
except ImportError:  # pragma: no cover - present in every release this targets
    ElucidatedImagen = None


def _rms_args(norm: ChanRMSNorm):
    """(weight, eps) of ops.channel_rms_norm_silu equal to this ChanRMSNorm."""
    c = norm.gamma.shape[0]
    return norm.gamma.reshape(c), 1e-12 / math.sqrt(c)


def _rms_norm_ok(norm) -> bool:
    return (type(norm) is ChanRMSNorm and norm.gamma.ndim == 3
            and math.isclose(norm.scale, math.sqrt(norm.gamma.shape[0]), rel_tol=1e-12))


# -------------------------------------------------------------------------- norms
class FastBlock(Block):
    _imagen_fast_original = Block

    def forward(self, x, scale_shift=None):
        scale, shift = scale_shift if scale_shift is not None else (None, None)
        weight, eps = _rms_args(self.norm)
        return self.project(ops.channel_rms_norm_silu(x, weight, eps, scale, shift, "silu"))


def _check_block(m: Block):
    if not _rms_norm_ok(m.norm):
        return None, f"norm {type(m.norm).__name__}: only ChanRMSNorm (sqrt(C) scale) is fused"
    if type(m.activation) is not nn.SiLU:
        return None, f"activation {type(m.activation).__name__}: only SiLU is fused"
    return FastBlock, "ChanRMSNorm + time scale/shift + SiLU -> ops.channel_rms_norm_silu"


class FastChanRMSNorm(ChanRMSNorm):
    _imagen_fast_original = ChanRMSNorm

    def forward(self, x):
        weight, eps = _rms_args(self)
        return ops.channel_rms_norm_silu(x, weight, eps, activation=None)


def _check_rms(m: ChanRMSNorm):
    if not _rms_norm_ok(m):
        return None, "gamma or scale not of the (C, 1, 1) / sqrt(C) form"
    return FastChanRMSNorm, "ops.channel_rms_norm_silu (no activation)"


# ---------------------------------------------------------------------- attention
def _cosine(q, k, q_scale, k_scale):
    return F.normalize(q, dim=-1) * q_scale, F.normalize(k, dim=-1) * k_scale


def _key_mask(mask):
    """imagen-pytorch's masks get a True in front for the null key."""
    return None if mask is None else F.pad(mask, (1, 0), value=True)


class FastAttention(Attention):
    _imagen_fast_original = Attention

    def forward(self, x, context=None, mask=None, attn_bias=None):
        if attn_bias is not None:          # an additive bias is not a padding mask
            return super().forward(x, context, mask, attn_bias)
        b, n = x.shape[:2]
        x = self.norm(x)
        q = self.to_q(x)
        k, v = self.to_kv(x).chunk(2, dim=-1)                    # one head: (B, N, D)
        nk, nv = (t.expand(b, 1, t.shape[-1]) for t in self.null_kv.unbind(dim=-2))
        ks, vs = [nk, k], [nv, v]
        if context is not None:
            ck, cv = self.to_context(context).chunk(2, dim=-1)
            ks.insert(0, ck)
            vs.insert(0, cv)
        k, v = torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)
        q = q.view(b, n, self.heads, -1).transpose(1, 2)          # (B, H, N, D)
        q, k = _cosine(q, k, self.q_scale, self.k_scale)
        d = q.shape[-1]
        # every head attends to the same keys: (B, 1, H * N, D) queries, one head
        out = ops.attention(q.reshape(b, 1, self.heads * n, d), k[:, None], v[:, None],
                            _key_mask(mask), scale=float(self.scale))
        out = out.view(b, self.heads, n, d).transpose(1, 2).reshape(b, n, self.heads * d)
        return self.to_out(out)


def _check_attention(m: Attention):
    return FastAttention, "cosine-sim multi-query attention -> ops.attention"


class FastCrossAttention(CrossAttention):
    _imagen_fast_original = CrossAttention

    def forward(self, x, context, mask=None):
        b, n = x.shape[:2]
        x = self.norm(x)
        context = self.norm_context(context)
        h = self.heads
        q = self.to_q(x)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        nk, nv = (t.expand(b, h, 1, t.shape[-1]) for t in self.null_kv.unbind(dim=-2))
        k, v = torch.cat((nk, k), dim=-2), torch.cat((nv, v), dim=-2)
        q, k = _cosine(q, k, self.q_scale, self.k_scale)
        out = ops.attention(q, k, v, _key_mask(mask), scale=float(self.scale))
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def _check_cross(m: CrossAttention):
    return FastCrossAttention, "cosine-sim cross-attention -> ops.attention (text mask as key mask)"


RULES = (
    Rule(Block, _check_block, claims=("norm",)),
    Rule(ChanRMSNorm, _check_rms),
    Rule(Attention, _check_attention),
    Rule(CrossAttention, _check_cross),
)


# ---------------------------------------------------------------- thresholding
class _ThresholdingScheduler:
    """A noise scheduler whose x0 predictions come back dynamically thresholded."""

    def __init__(self, inner, percentile: float):
        self._inner = inner
        self._percentile = percentile

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def predict_start_from_noise(self, *args, **kwargs):
        return ops.dynamic_threshold(self._inner.predict_start_from_noise(*args, **kwargs),
                                     self._percentile)

    def predict_start_from_v(self, *args, **kwargs):
        return ops.dynamic_threshold(self._inner.predict_start_from_v(*args, **kwargs),
                                     self._percentile)


@fast_method
def fast_p_mean_variance(self, unet, x, t, *, noise_scheduler, pred_objective="noise",
                         dynamic_threshold=True, **kwargs):
    original = type(self).p_mean_variance
    if dynamic_threshold and pred_objective in ("noise", "v"):
        noise_scheduler = _ThresholdingScheduler(noise_scheduler, self.dynamic_thresholding_percentile)
        dynamic_threshold = False          # the clamp to [-1, 1] that remains changes nothing
    return original(self, unet, x, t, noise_scheduler=noise_scheduler,
                    pred_objective=pred_objective, dynamic_threshold=dynamic_threshold, **kwargs)


@fast_method
def fast_threshold_x_start(self, x_start, dynamic_threshold=True):
    if not dynamic_threshold:
        return x_start.clamp(-1.0, 1.0)
    return ops.dynamic_threshold(x_start, self.dynamic_thresholding_percentile)


def _imagen(path: str, m: nn.Module, report: PatchReport) -> None:
    if ElucidatedImagen is not None and type(m) is ElucidatedImagen:
        name, func = "threshold_x_start", fast_threshold_x_start
    elif type(m) is Imagen:
        name, func = "p_mean_variance", fast_p_mean_variance
    else:
        return
    if overridden_methods(m):
        report.leave(path, m, "already accelerated")
        return
    override_method(m, name, func)
    report.replace(path, m, f"dynamic thresholding in {name} -> ops.dynamic_threshold")


OTHER = _imagen
