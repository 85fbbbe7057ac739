"""Imagen's U-Nets: the ADM-style base model (paper F.1) and the Efficient U-Net
(paper B.1, F.2, F.3) used by the super-resolution stages.

Both take the same inputs::

    model(x, t, text_embeds=None, text_mask=None, lowres=None, aug_level=None) -> prediction

x (B, C, H, W) noisy image; t (B,) continuous time in [0, 1]; text_embeds (B, L, text_dim)
frozen text-encoder outputs; text_mask (B, L) bool, True = real token; for super-resolution
models lowres (B, C, h, w) the (noise-augmented) low-resolution image, upsampled here
(bilinear) and concatenated to x, and aug_level (B,) its augmentation level in [0, 1].
The output has x's shape and is whatever the diffusion trains it to predict (eps or v).

Choices where the paper is silent (and why):
* Text tokens are projected once from text_dim to ``context_dim`` (a Linear) and then
  LayerNorm'ed again inside every attention layer and the pooling layer; with T5-XXL's
  4096-wide outputs a per-layer 4096-wide key/value projection would cost ~10M
  parameters per attention layer for no evidence of benefit. ``context_dim=None``
  keeps the raw text width instead.
* Efficient U-Net: a UBlock concatenates [input, skip / sqrt(2)] (the skip is the
  output of the matching DBlock; the deepest UBlock's input already is that output,
  so it takes no second copy); upsampling is a stride-2 transposed 3x3 conv.
  The input convolution's output is added to the last UBlock's, (a + b) / sqrt(2),
  before the output convolution, the only full-resolution layer besides the input conv.
* The 256->1024 model's text cross-attention sits at the lowest resolution: after the
  residual blocks of the last DBlock and of the first UBlock.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionBlock
from .blocks import GroupNormAct, ResBlock, zero_init
from .embeddings import AttentionPool, ScalarEmbedding

SKIP_SCALE = 1.0 / math.sqrt(2.0)


class Conditioning(nn.Module):
    """t, aug_level, text -> (emb (B, emb_dim), context tokens (B, L, D) or None)."""

    def __init__(self, emb_dim: int, text_dim: Optional[int], context_dim: Optional[int],
                 lowres_cond: bool, pool_heads: int = 8):
        super().__init__()
        self.time_embed = ScalarEmbedding(emb_dim)
        self.aug_embed = ScalarEmbedding(emb_dim) if lowres_cond else None
        self.text_dim = text_dim
        if text_dim is not None:
            width = context_dim or text_dim
            self.text_proj = nn.Linear(text_dim, width) if context_dim else nn.Identity()
            self.text_pool = AttentionPool(width, emb_dim, num_heads=pool_heads)
            self.context_dim = width
        else:
            self.text_proj = None
            self.text_pool = None
            self.context_dim = None

    def forward(self, t: Tensor, text_embeds: Optional[Tensor], text_mask: Optional[Tensor],
                aug_level: Optional[Tensor], dtype: torch.dtype):
        emb = self.time_embed(t)
        if self.aug_embed is not None:
            if aug_level is None:
                aug_level = torch.zeros_like(t)
            emb = emb + self.aug_embed(aug_level)
        context = None
        if self.text_pool is not None and text_embeds is not None:
            context = self.text_proj(text_embeds.to(dtype))
            emb = emb + self.text_pool(context, text_mask)
        return emb, context


class UNetLayer(nn.Module):
    """ResBlock, then optional attention, then an optional resampling ResBlock."""

    def __init__(self, res: nn.Module, attn: Optional[nn.Module] = None,
                 resample: Optional[nn.Module] = None):
        super().__init__()
        self.res = res
        self.attn = attn
        self.resample = resample

    def forward(self, h: Tensor, emb: Tensor, context: Optional[Tensor],
                mask: Optional[Tensor]) -> Tensor:
        h = self.res(h, emb)
        if self.attn is not None:
            h = self.attn(h, context, mask)
        if self.resample is not None:
            h = self.resample(h, emb)
        return h


class _UNetBase(nn.Module):
    """Shared input handling, checkpointing and config bookkeeping."""

    config: Dict

    def _init_common(self, lowres_cond: bool, use_checkpoint: bool) -> None:
        self.lowres_cond = lowres_cond
        self.use_checkpoint = use_checkpoint

    def _run(self, block: nn.Module, *args):
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _param_dtype(self) -> torch.dtype:
        return self.input_conv.weight.dtype

    def _prepare(self, x: Tensor, t: Tensor, text_embeds, text_mask, lowres, aug_level):
        if x.ndim != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self.lowres_cond:
            if lowres is None:
                raise ValueError("this super-resolution U-Net needs the lowres image")
            if lowres.shape[-2:] != x.shape[-2:]:
                lowres = F.interpolate(lowres.float(), size=x.shape[-2:], mode="bilinear",
                                       align_corners=False, antialias=False)
            x = torch.cat([x, lowres.to(x.dtype)], dim=1)
        elif lowres is not None:
            raise ValueError("lowres given to a U-Net built without lowres_cond")
        if text_embeds is not None and text_mask is not None:
            if text_mask.shape != text_embeds.shape[:2]:
                raise ValueError(f"text_mask must have shape {tuple(text_embeds.shape[:2])}, "
                                 f"got {tuple(text_mask.shape)}")
            text_mask = text_mask.bool()
        dtype = self._param_dtype()
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        emb, context = self.cond(t, text_embeds, text_mask, aug_level, dtype)
        return x, emb, context, text_mask

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class BaseUNet(_UNetBase):
    """ADM-style U-Net (Imagen F.1): BigGAN residual blocks that resample inside the
    block, scale-shift norm, self-attention with text tokens as extra keys/values at
    ``attn_resolutions``, a middle block ResBlock-Attention-ResBlock, and an output
    path with num_res_blocks + 1 blocks per level consuming every input-path skip.
    """

    def __init__(self, *, image_size: int, model_channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, attn_resolutions: Sequence[int], head_dim: int = 64,
                 text_dim: Optional[int] = None, context_dim: Optional[int] = None,
                 emb_dim: Optional[int] = None, in_channels: int = 3, out_channels: int = 3,
                 groups: int = 32, dropout: float = 0.0, lowres_cond: bool = False,
                 use_checkpoint: bool = False, pool_heads: int = 8):
        super().__init__()
        self._init_common(lowres_cond, use_checkpoint)
        emb_dim = emb_dim or 4 * model_channels
        self.cond = Conditioning(emb_dim, text_dim, context_dim, lowres_cond, pool_heads)
        ctx_dim = self.cond.context_dim

        def attn(ch):
            return AttentionBlock(ch, head_dim=head_dim, context_dim=ctx_dim, mode="self",
                                  groups=groups)

        def res(cin, cout, resample=None):
            return ResBlock(cin, cout, emb_dim, groups, resample=resample, dropout=dropout)

        ch = model_channels
        self.input_conv = nn.Conv2d(in_channels * (2 if lowres_cond else 1), ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs = [ch]
        res_now = image_size
        for level, mult in enumerate(channel_mult):
            out = model_channels * mult
            for _ in range(num_res_blocks):
                self.down.append(UNetLayer(res(ch, out), attn(out) if res_now in attn_resolutions else None))
                ch = out
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(UNetLayer(res(ch, ch, "down")))
                skip_chs.append(ch)
                res_now //= 2
        self.middle = UNetLayer(res(ch, ch), attn(ch), res(ch, ch))
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            out = model_channels * mult
            for i in range(num_res_blocks + 1):
                block_res = res(ch + skip_chs.pop(), out)
                ch = out
                a = attn(ch) if res_now in attn_resolutions else None
                up = res(ch, ch, "up") if (level and i == num_res_blocks) else None
                self.up.append(UNetLayer(block_res, a, up))
            if level:
                res_now *= 2
        self.out_norm = GroupNormAct(ch, groups)
        self.out_conv = zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))
        self.num_levels = len(channel_mult)

    def forward(self, x: Tensor, t: Tensor, text_embeds: Optional[Tensor] = None,
                text_mask: Optional[Tensor] = None, lowres: Optional[Tensor] = None,
                aug_level: Optional[Tensor] = None) -> Tensor:
        h, emb, context, mask = self._prepare(x, t, text_embeds, text_mask, lowres, aug_level)
        h = self.input_conv(h)
        skips = [h]
        for layer in self.down:
            h = self._run(layer, h, emb, context, mask)
            skips.append(h)
        h = self._run(self.middle, h, emb, context, mask)
        for layer in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layer, h, emb, context, mask)
        return self.out_conv(self.out_norm(h))


def _attn_list(make: Optional[Callable[[], nn.Module]], num_res_blocks: int,
               every: bool) -> Optional[nn.ModuleList]:
    """Attention after the last ResBlock, or after every one when ``every``."""
    if make is None:
        return None
    return nn.ModuleList(make() for _ in range(num_res_blocks if every else 1))


def _res_attn(res: nn.ModuleList, attn: Optional[nn.ModuleList], h, emb, context, mask):
    first_attn = len(res) - (len(attn) if attn is not None else 0)
    for i, block in enumerate(res):
        h = block(h, emb)
        if attn is not None and i >= first_attn:
            h = attn[i - first_attn](h, context, mask)
    return h


class DBlock(nn.Module):
    """Efficient U-Net DBlock: strided conv (downsample first) -> N ResBlocks -> [attention]."""

    def __init__(self, in_channels: int, channels: int, num_res_blocks: int, emb_dim: int,
                 groups: int, attn: Optional[Callable[[], nn.Module]], attn_every: bool = False,
                 stride: int = 2, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1)
        self.res = nn.ModuleList(ResBlock(channels, channels, emb_dim, groups, dropout=dropout)
                                 for _ in range(num_res_blocks))
        self.attn = _attn_list(attn, num_res_blocks, attn_every)

    def forward(self, h, emb, context, mask):
        h = self.down(h)
        h = _res_attn(self.res, self.attn, h, emb, context, mask)
        return h


class UBlock(nn.Module):
    """Efficient U-Net UBlock: [input, skip/sqrt(2)] -> N ResBlocks -> [attention] ->
    upsample (stride-2 transposed conv3x3) last."""

    def __init__(self, in_channels: int, skip_channels: int, channels: int, out_channels: int,
                 num_res_blocks: int, emb_dim: int, groups: int,
                 attn: Optional[Callable[[], nn.Module]], attn_every: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        cins = [in_channels + skip_channels] + [channels] * (num_res_blocks - 1)
        self.res = nn.ModuleList(ResBlock(cin, channels, emb_dim, groups, dropout=dropout)
                                 for cin in cins)
        self.attn = _attn_list(attn, num_res_blocks, attn_every)
        # transposed 3x3 conv, stride 2: the upsampling conv reads the low-res map, a
        # quarter of the work (and no full-res intermediate) of nearest + conv3x3
        self.up_conv = nn.ConvTranspose2d(channels, out_channels, 3, stride=2, padding=1,
                                          output_padding=1)

    def forward(self, h, skip, emb, context, mask):
        if skip is not None:
            h = torch.cat([h, skip * SKIP_SCALE], dim=1)
        h = _res_attn(self.res, self.attn, h, emb, context, mask)
        return self.up_conv(h)


def check_levels(channels, num_res_blocks, self_attention, cross_attention) -> int:
    """The Efficient U-Net's level count, after checking the per-level settings agree
    (shared by the torch and the Flax model)."""
    n = len(channels)
    for name, seq in (("num_res_blocks", num_res_blocks), ("self_attention", self_attention),
                      ("cross_attention", cross_attention)):
        if len(seq) != n:
            raise ValueError(f"{name} must have one entry per level ({n}), got {list(seq)}")
    if any(s and c for s, c in zip(self_attention, cross_attention)):
        raise ValueError("a level has either self-attention (with text) or cross-attention")
    return n


class EfficientUNet(_UNetBase):
    """Imagen's Efficient U-Net (B.1): more residual blocks at low resolution, skips
    scaled by 1/sqrt(2), DBlocks downsample before their convolutions and UBlocks
    upsample after them. Level k runs at resolution H / 2^(k+1).

    ``self_attention[k]`` puts self-attention (text tokens as extra keys/values) at
    the end of DBlock k and of UBlock k; ``cross_attention[k]`` puts text
    cross-attention there instead (for stages without self-attention). With
    ``attn_every_res_block`` the attention layer follows every ResBlock of such a
    level (ADM's convention for "attention at a resolution") instead of only the last.
    Attention heads: ``num_heads`` per layer, or ``head_dim`` channels per head.
    """

    def __init__(self, *, image_size: int, channels: Sequence[int], num_res_blocks: Sequence[int],
                 self_attention: Sequence[bool], cross_attention: Sequence[bool],
                 num_heads: Optional[int] = 8, head_dim: Optional[int] = None,
                 text_dim: Optional[int] = None,
                 context_dim: Optional[int] = None, emb_dim: Optional[int] = None,
                 init_channels: Optional[int] = None, in_channels: int = 3,
                 out_channels: int = 3, groups: int = 32, dropout: float = 0.0,
                 lowres_cond: bool = True, lowres_size: Optional[int] = None,
                 use_checkpoint: bool = False, pool_heads: int = 8,
                 attn_every_res_block: bool = False):
        super().__init__()
        n = check_levels(channels, num_res_blocks, self_attention, cross_attention)
        self._init_common(lowres_cond, use_checkpoint)
        emb_dim = emb_dim or 4 * channels[0]
        self.cond = Conditioning(emb_dim, text_dim, context_dim, lowres_cond, pool_heads)
        ctx_dim = self.cond.context_dim
        init_ch = init_channels or channels[0]
        heads = None if head_dim is not None else num_heads     # head_dim wins when given

        def attn(k, ch) -> Optional[Callable[[], nn.Module]]:
            if self_attention[k]:
                return lambda: AttentionBlock(ch, num_heads=heads, head_dim=head_dim,
                                              context_dim=ctx_dim, mode="self", groups=groups)
            if cross_attention[k] and ctx_dim is not None:
                return lambda: AttentionBlock(ch, num_heads=heads, head_dim=head_dim,
                                              context_dim=ctx_dim, mode="cross", groups=groups)
            return None

        self.input_conv = nn.Conv2d(in_channels * (2 if lowres_cond else 1), init_ch, 3, padding=1)
        self.dblocks = nn.ModuleList()
        prev = init_ch
        for k in range(n):
            self.dblocks.append(DBlock(prev, channels[k], num_res_blocks[k], emb_dim, groups,
                                       attn(k, channels[k]), attn_every_res_block,
                                       dropout=dropout))
            prev = channels[k]
        self.ublocks = nn.ModuleList()
        for k in reversed(range(n)):
            out = channels[k - 1] if k else init_ch
            skip_ch = channels[k] if k < n - 1 else 0      # the deepest input IS its skip
            self.ublocks.append(UBlock(prev, skip_ch, channels[k], out, num_res_blocks[k],
                                       emb_dim, groups, attn(k, channels[k]),
                                       attn_every_res_block, dropout=dropout))
            prev = out
        self.out_norm = GroupNormAct(init_ch, groups)
        self.out_conv = zero_init(nn.Conv2d(init_ch, out_channels, 3, padding=1))
        self.num_levels = n

    def forward(self, x: Tensor, t: Tensor, text_embeds: Optional[Tensor] = None,
                text_mask: Optional[Tensor] = None, lowres: Optional[Tensor] = None,
                aug_level: Optional[Tensor] = None) -> Tensor:
        h, emb, context, mask = self._prepare(x, t, text_embeds, text_mask, lowres, aug_level)
        h0 = self.input_conv(h)
        h = h0
        skips: List[Tensor] = []
        for block in self.dblocks:
            h = self._run(block, h, emb, context, mask)
            skips.append(h)
        skips.pop()                                     # the deepest skip is h itself
        for k, block in enumerate(self.ublocks):
            skip = skips.pop() if k else None
            h = self._run(block, h, skip, emb, context, mask)
        # In place: the last UBlock's output is used nowhere else (its transposed conv
        # saves only its input), and h0 is dropped before the output layers. Out of
        # place, four full-resolution maps were alive at once here, the peak of a
        # guided (2B) sampling step.
        h = h.add_(h0).mul_(SKIP_SCALE)
        del h0
        return self.out_conv(self.out_norm(h))
