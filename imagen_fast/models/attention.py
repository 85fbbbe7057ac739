"""Attention layers over image tokens, with text.

* ``mode="self"``: self-attention over the H*W image tokens whose keys/values are
  extended by the text tokens (Imagen's base and 64->256 models); the key padding
  mask is [all image tokens valid | text mask].
* ``mode="cross"``: explicit cross-attention, image queries over text keys/values only
  (Imagen's 256->1024 model, which has no self-attention). A fully padded prompt
  gives an all-False mask; ops.attention returns zeros, so the layer is the identity.

Text tokens get a LayerNorm inside every layer before their key/value projection.
All attention goes through ``imagen_fast.ops.attention``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from .blocks import GroupNormAct, zero_init


def attention_heads(channels: int, num_heads: Optional[int], head_dim: Optional[int],
                    mode: str, context_dim: Optional[int]) -> int:
    """The head count of an attention layer, after checking its arguments (shared by
    the torch and the Flax AttentionBlock)."""
    if mode not in ("self", "cross"):
        raise ValueError(f"mode must be 'self' or 'cross', got {mode!r}")
    if (num_heads is None) == (head_dim is None):
        raise ValueError("give exactly one of num_heads and head_dim")
    if head_dim is not None:
        if channels % head_dim:
            raise ValueError(f"channels={channels} not divisible by head_dim={head_dim}")
        num_heads = channels // head_dim
    if channels % num_heads:
        raise ValueError(f"channels={channels} not divisible by num_heads={num_heads}")
    if mode == "cross" and context_dim is None:
        raise ValueError("cross-attention needs context_dim")
    return num_heads


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, *, num_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, context_dim: Optional[int] = None,
                 mode: str = "self", groups: int = 32):
        super().__init__()
        num_heads = attention_heads(channels, num_heads, head_dim, mode, context_dim)
        self.mode = mode
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.norm = GroupNormAct(channels, groups, activation=None)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(channels, 2 * channels) if mode == "self" else None
        if context_dim is not None:
            self.context_norm = nn.LayerNorm(context_dim)
            self.context_kv = nn.Linear(context_dim, 2 * channels)
        else:
            self.context_norm = None
            self.context_kv = None
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def _heads(self, t: Tensor) -> Tensor:
        """(B, L, C) -> contiguous (B, heads, L, head_dim).

        Contiguous, not a strided view: the attention op's fake (meta) backward returns
        gradients shaped like its inputs while the eager kernels return contiguous
        ones, and a compiled backward breaks on that stride mismatch.
        """
        b, l, _ = t.shape
        return t.view(b, l, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

    def _keys_values(self, tokens: Tensor, context: Optional[Tensor],
                     context_mask: Optional[Tensor], q_dtype: torch.dtype):
        """(k, v, mask) in heads layout, or None when there is nothing to attend to.
        A function of its own so the projections' full-width outputs are freed before
        the attention runs (they would otherwise stay alive beside k and v)."""
        b, hw, _ = tokens.shape
        ks, vs = [], []
        mask_parts = []
        if self.mode == "self":
            k_img, v_img = self.to_kv(tokens).chunk(2, dim=-1)
            ks.append(k_img)
            vs.append(v_img)
        if context is not None and self.context_kv is not None:
            k_txt, v_txt = self.context_kv(self.context_norm(context)).chunk(2, dim=-1)
            ks.append(k_txt.to(q_dtype))
            vs.append(v_txt.to(q_dtype))
            if context_mask is not None:
                if self.mode == "self":
                    mask_parts.append(torch.ones(b, hw, dtype=torch.bool, device=tokens.device))
                mask_parts.append(context_mask)
        if not ks:
            return None
        k = self._heads(torch.cat(ks, dim=1).to(q_dtype))
        v = self._heads(torch.cat(vs, dim=1).to(q_dtype))
        # No mask at all when every key is valid: kernels take their unmasked fast path.
        mask = torch.cat(mask_parts, dim=1) if mask_parts else None
        return k, v, mask

    def forward(self, x: Tensor, context: Optional[Tensor] = None,
                context_mask: Optional[Tensor] = None) -> Tensor:
        b, c, h, w = x.shape
        # channels_last NCHW -> (B, HW, C) is a view, no copy.
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        q = self._heads(self.to_q(tokens))
        kv = self._keys_values(tokens, context, context_mask, q.dtype)
        del tokens
        if kv is None:
            # cross-attention with no text: nothing to attend to, the layer is the identity
            return x
        out = ops.attention(q, *kv[:2], key_padding_mask=kv[2])     # (B, heads, HW, Dh)
        del q, kv
        out = self.proj_out(out.transpose(1, 2).reshape(b, h * w, c))
        out = out.reshape(b, h, w, c).permute(0, 3, 1, 2)           # channels_last NCHW view
        return x + out
