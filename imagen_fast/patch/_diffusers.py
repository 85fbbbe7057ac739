"""diffusers: DeepFloyd IF-style UNet2DConditionModel and the DDPM/DDIM schedulers.

Replaced:
* ResnetBlock2D (time_embedding_norm "default" or "scale_shift", SiLU or exact GELU):
  norm1 + activation and norm2 + FiLM (x * (1 + scale) + shift) + activation become
  two ops.group_norm_silu calls; the rest of the block is unchanged.
* Attention with AttnAddedKVProcessor / AttnAddedKVProcessor2_0 (SimpleCrossAttn
  blocks: the projected text tokens are concatenated to the self-attention keys and
  values): the processor is wrapped by one that runs the group norms with
  ops.group_norm_silu and the attention with ops.attention, the text padding mask
  as a key padding mask. The UNet hands the mask over as a 0 / -10000 bias; any
  other bias (not expressible as a padding mask) goes to the original processor.
* DDPMScheduler / DDIMScheduler with thresholding=True: _threshold_sample becomes
  ops.dynamic_threshold (s = clamp(quantile(|x0|, ratio), 1, sample_max_value)),
  overridden on the instance (the class, and so a saved config, keep their names).
"""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import (Attention, AttnAddedKVProcessor,
                                                  AttnAddedKVProcessor2_0)
from diffusers.models.resnet import ResnetBlock2D
from diffusers.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from .. import ops
from ._core import PatchReport, Rule, fast_method, override_method, overridden_methods
from ._torch import activation_name, group_norm

# A bias at or below this is a masked key: exp(-1e4 + score) is 0 in every float type.
MASKED_BIAS = -1e4


# ------------------------------------------------------------------ ResnetBlock2D
class FastResnetBlock2D(ResnetBlock2D):
    _imagen_fast_original = ResnetBlock2D

    def forward(self, input_tensor, temb, *args, **kwargs):
        if args or kwargs.get("scale") is not None:       # deprecated form: the original says so
            return super().forward(input_tensor, temb, *args, **kwargs)
        act = activation_name(self.nonlinearity)
        x = input_tensor
        h = group_norm(x, self.norm1, activation=act)
        if self.upsample is not None:
            if h.shape[0] >= 64:                          # as the original (nearest upsampling)
                x, h = x.contiguous(), h.contiguous()
            x, h = self.upsample(x), self.upsample(h)
        elif self.downsample is not None:
            x, h = self.downsample(x), self.downsample(h)
        h = self.conv1(h)
        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        scale = shift = None
        if self.time_embedding_norm == "default":
            if temb is not None:
                h = h + temb
        else:  # "scale_shift" (the only other mode the rule accepts)
            if temb is None:
                raise ValueError("`temb` should not be None when `time_embedding_norm` is scale_shift")
            scale, shift = torch.chunk(temb, 2, dim=1)
        h = group_norm(h, self.norm2, scale, shift, act)
        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x.contiguous() if self.training else x)
        return (x + h) / self.output_scale_factor


def _check_resnet(m: ResnetBlock2D):
    if activation_name(m.nonlinearity) is None:
        return None, f"activation {m.nonlinearity!r}: no fused op (silu and exact gelu are)"
    if m.time_embedding_norm not in ("default", "scale_shift"):
        return None, f"time_embedding_norm {m.time_embedding_norm!r} is not fused"
    if not (type(m.norm1) is nn.GroupNorm and type(m.norm2) is nn.GroupNorm):
        return None, "norm1/norm2 are not plain nn.GroupNorm"
    film = "FiLM + " if m.time_embedding_norm == "scale_shift" else ""
    return FastResnetBlock2D, (f"norm1+{activation_name(m.nonlinearity)} and norm2+{film}"
                               f"{activation_name(m.nonlinearity)} -> ops.group_norm_silu")


RESNET = Rule(ResnetBlock2D, _check_resnet, claims=("norm1", "norm2"))


# ------------------------------------------------------------- added-KV attention
def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H * D) -> (B, H, L, D), a view."""
    b, length, inner = t.shape
    return t.view(b, length, heads, inner // heads).transpose(1, 2)


def text_keep_mask(bias, batch: int, text_len: int):
    """(usable, keep): the UNet's (B, 1, L_text) 0 / -10000 bias (or a bool mask, True =
    attend) as a (B, L_text) bool key mask; keep is None when every token is kept.
    usable is False for biases a padding mask cannot express."""
    if bias is None:
        return True, None
    if bias.shape[-1] != text_len or bias.numel() != batch * text_len:
        return False, None
    if bias.dtype == torch.bool:
        keep = bias
    else:
        keep = bias == 0
        if not bool((keep | (bias <= MASKED_BIAS)).all()):
            return False, None
    keep = keep.reshape(batch, text_len)
    return True, (None if bool(keep.all()) else keep)


class FastAddedKVProcessor:
    """Stands in for an AttnAddedKVProcessor(2_0) and holds it as ``original``."""

    def __init__(self, original):
        self.original = original
        # AttnAddedKVProcessor2_0 calls SDPA with its default scale 1/sqrt(head dim);
        # AttnAddedKVProcessor uses attn.scale.
        self.use_attn_scale = type(original) is AttnAddedKVProcessor

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None,
                 attention_mask=None, *args, **kwargs):
        b, c = hidden_states.shape[:2]
        ok = encoder_hidden_states is not None and not args and kwargs.get("scale") is None
        keep = None
        if ok:
            ok, keep = text_keep_mask(attention_mask, b, encoder_hidden_states.shape[1])
        if not ok:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 *args, **kwargs)
        residual = hidden_states
        context = encoder_hidden_states
        if isinstance(attn.norm_cross, nn.GroupNorm):
            context = group_norm(context.transpose(1, 2), attn.norm_cross).transpose(1, 2)
        elif attn.norm_cross is not None:
            context = attn.norm_encoder_hidden_states(context)
        tokens = group_norm(hidden_states.reshape(b, c, -1), attn.group_norm).transpose(1, 2)
        n_img = tokens.shape[1]
        h = attn.heads
        q = _heads(attn.to_q(tokens), h)
        k = torch.cat([_heads(attn.add_k_proj(context), h), _heads(attn.to_k(tokens), h)], dim=2)
        v = torch.cat([_heads(attn.add_v_proj(context), h), _heads(attn.to_v(tokens), h)], dim=2)
        mask = None
        if keep is not None:   # text keys first, then the image tokens (always kept)
            mask = torch.cat([keep, keep.new_ones(b, n_img)], dim=1)
        out = ops.attention(q, k, v, mask, attn.scale if self.use_attn_scale else None)
        out = out.transpose(1, 2).reshape(b, n_img, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        return out.transpose(-1, -2).reshape(residual.shape) + residual


def _attention(path: str, m: nn.Module, report: PatchReport) -> None:
    if type(m).__name__ == "AttentionPooling":
        report.leave(path, m, "attention pooling of the text (one query per prompt, no mask): "
                     "a tiny share of the time, PyTorch runs it")
        return
    if type(m) is not Attention:
        return
    proc = m.processor
    if isinstance(proc, FastAddedKVProcessor):
        report.leave(path, m, "already accelerated")
    elif type(proc) not in (AttnAddedKVProcessor, AttnAddedKVProcessor2_0):
        report.leave(path, m, f"processor {type(proc).__name__}: only the added-KV processors "
                     "(text tokens concatenated to self-attention keys) are replaced")
    elif m.only_cross_attention:
        report.leave(path, m, "only_cross_attention: a fully padded prompt would differ "
                     "(diffusers averages the padded keys, ops.attention outputs zeros)")
    elif not isinstance(m.group_norm, nn.GroupNorm):
        report.leave(path, m, "no group_norm on the image tokens")
    else:
        m.set_processor(FastAddedKVProcessor(proc))
        report.replace(path, m, f"{type(proc).__name__} -> ops.group_norm_silu + ops.attention "
                       "(text padding mask as key padding mask)")


def _restore_attention(path: str, m: nn.Module, report: PatchReport) -> None:
    if type(m) is Attention and isinstance(m.processor, FastAddedKVProcessor):
        m.set_processor(m.processor.original)
        report.replace(path, m, "processor restored")


# --------------------------------------------------------------------- schedulers
@fast_method
def fast_threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
    """The scheduler's _threshold_sample as one fused op (same percentile definition:
    s = clamp(quantile(|x0|, ratio), 1, sample_max_value), clip, divide)."""
    cfg = self.config
    return ops.dynamic_threshold(sample, cfg.dynamic_thresholding_ratio, min_value=1.0,
                                 max_value=cfg.sample_max_value)


def patch_scheduler(scheduler, report: PatchReport) -> None:
    if type(scheduler) not in (DDPMScheduler, DDIMScheduler):
        report.leave("", scheduler, "only DDPMScheduler and DDIMScheduler thresholding is replaced")
    elif overridden_methods(scheduler):
        report.leave("", scheduler, "already accelerated")
    elif not scheduler.config.thresholding:
        report.leave("", scheduler, "thresholding=False: nothing to replace")
    else:
        override_method(scheduler, "_threshold_sample", fast_threshold_sample)
        report.replace("", scheduler, "_threshold_sample -> ops.dynamic_threshold")


def is_scheduler(obj) -> bool:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    return isinstance(obj, SchedulerMixin)


RULES = (RESNET,)
OTHER = _attention
RESTORE = _restore_attention
