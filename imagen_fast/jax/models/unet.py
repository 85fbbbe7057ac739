"""Imagen's U-Nets in Flax NNX: the same models as ``imagen_fast.models`` (same
constructor arguments, same modules and parameter names, same maths), with images
channels-last (B, H, W, C).

    model(x, t, text_embeds=None, text_mask=None, lowres=None, aug_level=None)

x (B, H, W, 3) noisy image, t (B,) time in [0, 1], text_embeds (B, L, text_dim),
text_mask (B, L) bool (True = real token), lowres (B, h, w, 3) and aug_level (B,) for
super-resolution models. The design notes (where the paper is silent) are those of
``imagen_fast.models.unet``; a torch state dict converts key for key
(``imagen_fast.jax.convert``). Normalisation and attention go through
``imagen_fast.jax.ops`` (Pallas kernels on TPU).

Not carried over: dropout > 0 (every preset uses 0; a ValueError says so).
``use_checkpoint`` rematerialises each block in the backward (jax.checkpoint).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...models.attention import attention_heads
from ...models.unet import SKIP_SCALE, check_levels
from .. import ops
from .layers import (
    Conv2d,
    ConvTranspose2d,
    GroupNormAct,
    LayerNorm,
    Linear,
    SiLU,
    zero_init,
)


def sinusoidal_embedding(values, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
    """(B,) -> (B, dim) [cos | sin] features in float32 (as the torch model)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = values.astype(jnp.float32)[:, None] * scale * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def downsample(x):
    """2x2 average pool (odd trailing rows/columns dropped, as F.avg_pool2d)."""
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample(x):
    """2x nearest-neighbour."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _bilinear_axis(x, axis: int, out: int):
    """Resize one axis like F.interpolate(mode="bilinear", align_corners=False,
    antialias=False): source = (i + 0.5) * in / out - 0.5, clamped at 0."""
    n = x.shape[axis]
    src = jnp.maximum((jnp.arange(out, dtype=jnp.float32) + 0.5) * (n / out) - 0.5, 0.0)
    lo = jnp.floor(src).astype(jnp.int32)
    lo = jnp.minimum(lo, n - 1)
    hi = jnp.minimum(lo + 1, n - 1)
    frac = src - lo.astype(jnp.float32)
    shape = [1] * x.ndim
    shape[axis] = out
    frac = frac.reshape(shape)
    return jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac


def resize_bilinear(x, size):
    """(B, h, w, C) -> (B, H, W, C), float32 maths."""
    y = _bilinear_axis(x.astype(jnp.float32), 1, size[0])
    return _bilinear_axis(y, 2, size[1])


# ------------------------------------------------------------------ embeddings
class ScalarEmbedding(nnx.Module):
    def __init__(self, emb_dim: int, freq_dim: int = 256, *, rng: np.random.Generator):
        self.freq_dim = freq_dim
        self.mlp = nnx.List([Linear(freq_dim, emb_dim, rng=rng), SiLU(),
                             Linear(emb_dim, emb_dim, rng=rng)])

    def __call__(self, values, dtype):
        h = sinusoidal_embedding(values, self.freq_dim).astype(dtype)
        for layer in self.mlp:
            h = layer(h)
        return h


class AttentionPool(nnx.Module):
    """Learned queries (one per head) over the LayerNorm'ed tokens, masked."""
    TORCH_LAYOUT = {"query": "same"}

    def __init__(self, dim: int, out_dim: int, num_heads: int = 8, *, rng: np.random.Generator):
        if dim % num_heads:
            raise ValueError(f"AttentionPool: dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = LayerNorm(dim)
        self.query = nnx.Param(jnp.asarray(
            (rng.standard_normal((num_heads, self.head_dim)) * dim ** -0.5).astype(np.float32)))
        self.to_kv = Linear(dim, 2 * dim, bias=False, rng=rng)
        self.proj = Linear(dim, out_dim, rng=rng)

    def __call__(self, tokens, mask):
        b, l, d = tokens.shape
        kv = self.to_kv(self.norm(tokens)).reshape(b, l, 2, self.num_heads, self.head_dim)
        kv = kv.transpose(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        q = jnp.broadcast_to(self.query[...].astype(k.dtype)[None, :, None, :],
                             (b, self.num_heads, 1, self.head_dim))
        pooled = ops.attention(q, k, v, mask)                      # (B, heads, 1, Dh)
        return self.proj(pooled.reshape(b, d))


class Conditioning(nnx.Module):
    """t, aug_level, text -> (emb (B, emb_dim), context tokens (B, L, D) or None)."""

    def __init__(self, emb_dim: int, text_dim: Optional[int], context_dim: Optional[int],
                 lowres_cond: bool, pool_heads: int = 8, *, rng: np.random.Generator):
        self.time_embed = ScalarEmbedding(emb_dim, rng=rng)
        self.aug_embed = ScalarEmbedding(emb_dim, rng=rng) if lowres_cond else None
        self.text_dim = text_dim
        has_text = text_dim is not None
        width = (context_dim or text_dim) if has_text else None
        self.text_proj = Linear(text_dim, width, rng=rng) if has_text and context_dim else None
        self.text_pool = (AttentionPool(width, emb_dim, num_heads=pool_heads, rng=rng)
                          if has_text else None)
        self.context_dim = width

    def __call__(self, t, text_embeds, text_mask, aug_level, dtype):
        emb = self.time_embed(t, dtype)
        if self.aug_embed is not None:
            emb = emb + self.aug_embed(jnp.zeros_like(t) if aug_level is None else aug_level, dtype)
        context = None
        if self.text_pool is not None and text_embeds is not None:
            context = text_embeds.astype(dtype)
            if self.text_proj is not None:
                context = self.text_proj(context)
            emb = emb + self.text_pool(context, text_mask)
        return emb, context


# ---------------------------------------------------------------------- blocks
class ResBlock(nnx.Module):
    """h = conv3x3(SiLU(GN(x))); h = conv3x3(SiLU(GN(h) * (1 + scale) + shift));
    out = skip(x) + h, with optional "down"/"up" resampling inside (BigGAN)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int = 32,
                 resample: Optional[str] = None, dropout: float = 0.0, *, rng: np.random.Generator):
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample must be None, 'down' or 'up', got {resample!r}")
        if dropout:
            raise ValueError(f"dropout={dropout}: the JAX U-Nets support dropout 0 only "
                             f"(what every preset uses)")
        self.resample = resample
        self.norm1 = GroupNormAct(in_channels, groups)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, rng=rng)
        self.emb_proj = Linear(emb_dim, 2 * out_channels, rng=rng)
        self.norm2 = GroupNormAct(out_channels, groups)
        self.conv2 = zero_init(Conv2d(out_channels, out_channels, 3, padding=1, rng=rng))
        self.skip = (None if in_channels == out_channels
                     else Conv2d(in_channels, out_channels, 1, rng=rng))

    def _resample(self, x):
        if self.resample == "down":
            return downsample(x)
        if self.resample == "up":
            return upsample(x)
        return x

    def __call__(self, x, emb):
        h = self.conv1(self._resample(self.norm1(x)))
        x = self._resample(x)
        scale, shift = jnp.split(self.emb_proj(jax.nn.silu(emb)), 2, axis=1)
        h = self.conv2(self.norm2(h, scale, shift))
        return h + (x if self.skip is None else self.skip(x))


class AttentionBlock(nnx.Module):
    """Self-attention over the image tokens with the text tokens as extra keys/values
    (mode "self"), or cross-attention over the text only (mode "cross")."""

    def __init__(self, channels: int, *, num_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, context_dim: Optional[int] = None,
                 mode: str = "self", groups: int = 32, rng: np.random.Generator):
        num_heads = attention_heads(channels, num_heads, head_dim, mode, context_dim)
        self.mode = mode
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.norm = GroupNormAct(channels, groups, activation=None)
        self.to_q = Linear(channels, channels, rng=rng)
        self.to_kv = Linear(channels, 2 * channels, rng=rng) if mode == "self" else None
        with_text = context_dim is not None
        self.context_norm = LayerNorm(context_dim) if with_text else None
        self.context_kv = Linear(context_dim, 2 * channels, rng=rng) if with_text else None
        self.proj_out = zero_init(Linear(channels, channels, rng=rng))

    def _heads(self, t):
        b, l, _ = t.shape
        return t.reshape(b, l, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def __call__(self, x, context=None, context_mask=None):
        b, h, w, c = x.shape
        tokens = self.norm(x).reshape(b, h * w, c)
        q = self._heads(self.to_q(tokens))
        ks, vs, mask_parts = [], [], []
        if self.mode == "self":
            k_img, v_img = jnp.split(self.to_kv(tokens), 2, axis=-1)
            ks.append(k_img)
            vs.append(v_img)
        if context is not None and self.context_kv is not None:
            k_txt, v_txt = jnp.split(self.context_kv(self.context_norm(context)), 2, axis=-1)
            ks.append(k_txt.astype(q.dtype))
            vs.append(v_txt.astype(q.dtype))
            if context_mask is not None:
                if self.mode == "self":
                    mask_parts.append(jnp.ones((b, h * w), bool))
                mask_parts.append(context_mask)
        if not ks:
            return x                      # cross-attention without text: the identity
        k = self._heads(jnp.concatenate(ks, axis=1))
        v = self._heads(jnp.concatenate(vs, axis=1))
        mask = jnp.concatenate(mask_parts, axis=1) if mask_parts else None
        out = ops.attention(q, k, v, mask)                           # (B, heads, HW, Dh)
        out = self.proj_out(out.transpose(0, 2, 1, 3).reshape(b, h * w, c))
        return x + out.reshape(b, h, w, c)


class UNetLayer(nnx.Module):
    """ResBlock, then optional attention, then an optional resampling ResBlock."""

    def __init__(self, res, attn=None, resample=None):
        self.res, self.attn, self.resample = res, attn, resample

    def __call__(self, h, emb, context, mask):
        h = self.res(h, emb)
        if self.attn is not None:
            h = self.attn(h, context, mask)
        if self.resample is not None:
            h = self.resample(h, emb)
        return h


def _attn_list(make, num_res_blocks: int, every: bool):
    if make is None:
        return None
    return nnx.List([make() for _ in range(num_res_blocks if every else 1)])


def _res_attn(res, attn, h, emb, context, mask):
    first_attn = len(res) - (len(attn) if attn is not None else 0)
    for i, block in enumerate(res):
        h = block(h, emb)
        if attn is not None and i >= first_attn:
            h = attn[i - first_attn](h, context, mask)
    return h


class DBlock(nnx.Module):
    """Strided conv (downsample first) -> N ResBlocks -> [attention]."""

    def __init__(self, in_channels, channels, num_res_blocks, emb_dim, groups, attn,
                 attn_every=False, stride=2, dropout=0.0, *, rng: np.random.Generator):
        self.down = Conv2d(in_channels, channels, 3, stride=stride, padding=1, rng=rng)
        self.res = nnx.List([ResBlock(channels, channels, emb_dim, groups, dropout=dropout, rng=rng)
                             for _ in range(num_res_blocks)])
        self.attn = _attn_list(attn, num_res_blocks, attn_every)

    def __call__(self, h, emb, context, mask):
        return _res_attn(self.res, self.attn, self.down(h), emb, context, mask)


class UBlock(nnx.Module):
    """[input, skip / sqrt(2)] -> N ResBlocks -> [attention] -> transposed conv up."""

    def __init__(self, in_channels, skip_channels, channels, out_channels, num_res_blocks,
                 emb_dim, groups, attn, attn_every=False, dropout=0.0, *, rng: np.random.Generator):
        cins = [in_channels + skip_channels] + [channels] * (num_res_blocks - 1)
        self.res = nnx.List([ResBlock(cin, channels, emb_dim, groups, dropout=dropout, rng=rng)
                             for cin in cins])
        self.attn = _attn_list(attn, num_res_blocks, attn_every)
        self.up_conv = ConvTranspose2d(channels, out_channels, 3, stride=2, padding=1,
                                       output_padding=1, rng=rng)

    def __call__(self, h, skip, emb, context, mask):
        if skip is not None:
            h = jnp.concatenate([h, skip * SKIP_SCALE], axis=-1)
        return self.up_conv(_res_attn(self.res, self.attn, h, emb, context, mask))


# ----------------------------------------------------------------------- U-Nets
class _UNetBase(nnx.Module):
    def _init_common(self, lowres_cond: bool, use_checkpoint: bool, dtype) -> None:
        self.lowres_cond = lowres_cond
        self.use_checkpoint = use_checkpoint
        self.dtype = jnp.dtype(dtype)

    def _run(self, block, *args):
        if self.use_checkpoint:
            return nnx.remat(lambda block, *a: block(*a))(block, *args)
        return block(*args)

    def _prepare(self, x, t, text_embeds, text_mask, lowres, aug_level):
        if x.ndim != 4:
            raise ValueError(f"x must be (B, H, W, C), got shape {tuple(x.shape)}")
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (x.shape[0],))
        if self.lowres_cond:
            if lowres is None:
                raise ValueError("this super-resolution U-Net needs the lowres image")
            if lowres.shape[1:3] != x.shape[1:3]:
                lowres = resize_bilinear(lowres, x.shape[1:3])
            x = jnp.concatenate([x, lowres.astype(x.dtype)], axis=-1)
        elif lowres is not None:
            raise ValueError("lowres given to a U-Net built without lowres_cond")
        if text_embeds is not None and text_mask is not None:
            if tuple(text_mask.shape) != tuple(text_embeds.shape[:2]):
                raise ValueError(f"text_mask must have shape {tuple(text_embeds.shape[:2])}, "
                                 f"got {tuple(text_mask.shape)}")
            text_mask = text_mask.astype(bool)
        x = x.astype(self.dtype)
        emb, context = self.cond(t, text_embeds, text_mask, aug_level, self.dtype)
        return x, emb, context, text_mask


class BaseUNet(_UNetBase):
    """ADM-style U-Net (Imagen F.1); see imagen_fast.models.unet.BaseUNet."""

    def __init__(self, *, image_size: int, model_channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, attn_resolutions: Sequence[int], head_dim: int = 64,
                 text_dim: Optional[int] = None, context_dim: Optional[int] = None,
                 emb_dim: Optional[int] = None, in_channels: int = 3, out_channels: int = 3,
                 groups: int = 32, dropout: float = 0.0, lowres_cond: bool = False,
                 use_checkpoint: bool = False, pool_heads: int = 8, dtype=jnp.float32,
                 rng: Optional[np.random.Generator] = None):
        rng = rng if rng is not None else np.random.default_rng(0)
        self._init_common(lowres_cond, use_checkpoint, dtype)
        emb_dim = emb_dim or 4 * model_channels
        self.cond = Conditioning(emb_dim, text_dim, context_dim, lowres_cond, pool_heads, rng=rng)
        ctx_dim = self.cond.context_dim

        def attn(ch):
            return AttentionBlock(ch, head_dim=head_dim, context_dim=ctx_dim, mode="self",
                                  groups=groups, rng=rng)

        def res(cin, cout, resample=None):
            return ResBlock(cin, cout, emb_dim, groups, resample=resample, dropout=dropout, rng=rng)

        ch = model_channels
        self.input_conv = Conv2d(in_channels * (2 if lowres_cond else 1), ch, 3, padding=1, rng=rng)
        down, skip_chs, res_now = [], [ch], image_size
        for level, mult in enumerate(channel_mult):
            out = model_channels * mult
            for _ in range(num_res_blocks):
                down.append(UNetLayer(res(ch, out), attn(out) if res_now in attn_resolutions else None))
                ch = out
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                down.append(UNetLayer(res(ch, ch, "down")))
                skip_chs.append(ch)
                res_now //= 2
        self.down = nnx.List(down)
        self.middle = UNetLayer(res(ch, ch), attn(ch), res(ch, ch))
        up = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            out = model_channels * mult
            for i in range(num_res_blocks + 1):
                block_res = res(ch + skip_chs.pop(), out)
                ch = out
                a = attn(ch) if res_now in attn_resolutions else None
                resample = res(ch, ch, "up") if (level and i == num_res_blocks) else None
                up.append(UNetLayer(block_res, a, resample))
            if level:
                res_now *= 2
        self.up = nnx.List(up)
        self.out_norm = GroupNormAct(ch, groups)
        self.out_conv = zero_init(Conv2d(ch, out_channels, 3, padding=1, rng=rng))

    def __call__(self, x, t, text_embeds=None, text_mask=None, lowres=None, aug_level=None):
        h, emb, context, mask = self._prepare(x, t, text_embeds, text_mask, lowres, aug_level)
        h = self.input_conv(h)
        skips = [h]
        for layer in self.down:
            h = self._run(layer, h, emb, context, mask)
            skips.append(h)
        h = self._run(self.middle, h, emb, context, mask)
        for layer in self.up:
            h = self._run(layer, jnp.concatenate([h, skips.pop()], axis=-1), emb, context, mask)
        return self.out_conv(self.out_norm(h))


class EfficientUNet(_UNetBase):
    """Imagen's Efficient U-Net (B.1); see imagen_fast.models.unet.EfficientUNet."""

    def __init__(self, *, image_size: int, channels: Sequence[int], num_res_blocks: Sequence[int],
                 self_attention: Sequence[bool], cross_attention: Sequence[bool],
                 num_heads: Optional[int] = 8, head_dim: Optional[int] = None,
                 text_dim: Optional[int] = None, context_dim: Optional[int] = None,
                 emb_dim: Optional[int] = None, init_channels: Optional[int] = None,
                 in_channels: int = 3, out_channels: int = 3, groups: int = 32,
                 dropout: float = 0.0, lowres_cond: bool = True, lowres_size: Optional[int] = None,
                 use_checkpoint: bool = False, pool_heads: int = 8,
                 attn_every_res_block: bool = False, dtype=jnp.float32,
                 rng: Optional[np.random.Generator] = None):
        rng = rng if rng is not None else np.random.default_rng(0)
        n = check_levels(channels, num_res_blocks, self_attention, cross_attention)
        self._init_common(lowres_cond, use_checkpoint, dtype)
        emb_dim = emb_dim or 4 * channels[0]
        self.cond = Conditioning(emb_dim, text_dim, context_dim, lowres_cond, pool_heads, rng=rng)
        ctx_dim = self.cond.context_dim
        init_ch = init_channels or channels[0]
        heads = None if head_dim is not None else num_heads

        def attn(k, ch):
            mode = "self" if self_attention[k] else "cross" if cross_attention[k] and ctx_dim else None
            if mode is None:
                return None
            return lambda: AttentionBlock(ch, num_heads=heads, head_dim=head_dim,
                                          context_dim=ctx_dim, mode=mode, groups=groups, rng=rng)

        self.input_conv = Conv2d(in_channels * (2 if lowres_cond else 1), init_ch, 3, padding=1,
                                 rng=rng)
        dblocks, prev = [], init_ch
        for k in range(n):
            dblocks.append(DBlock(prev, channels[k], num_res_blocks[k], emb_dim, groups,
                                  attn(k, channels[k]), attn_every_res_block, dropout=dropout,
                                  rng=rng))
            prev = channels[k]
        self.dblocks = nnx.List(dblocks)
        ublocks = []
        for k in reversed(range(n)):
            out = channels[k - 1] if k else init_ch
            skip_ch = channels[k] if k < n - 1 else 0
            ublocks.append(UBlock(prev, skip_ch, channels[k], out, num_res_blocks[k], emb_dim,
                                  groups, attn(k, channels[k]), attn_every_res_block,
                                  dropout=dropout, rng=rng))
            prev = out
        self.ublocks = nnx.List(ublocks)
        self.out_norm = GroupNormAct(init_ch, groups)
        self.out_conv = zero_init(Conv2d(init_ch, out_channels, 3, padding=1, rng=rng))

    def __call__(self, x, t, text_embeds=None, text_mask=None, lowres=None, aug_level=None):
        h, emb, context, mask = self._prepare(x, t, text_embeds, text_mask, lowres, aug_level)
        h0 = self.input_conv(h)
        h = h0
        skips = []
        for block in self.dblocks:
            h = self._run(block, h, emb, context, mask)
            skips.append(h)
        skips.pop()
        for k, block in enumerate(self.ublocks):
            skip = skips.pop() if k else None
            h = self._run(block, h, skip, emb, context, mask)
        return self.out_conv(self.out_norm((h + h0) * SKIP_SCALE))
