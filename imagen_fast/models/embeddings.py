"""Conditioning embeddings: diffusion time, noise-augmentation level, pooled text.

Every U-Net builds one conditioning vector per sample,

    emb = MLP(sinusoid(t)) [+ MLP(sinusoid(aug_level))] [+ AttentionPool(text)]

and each residual block turns ``emb`` into a FiLM scale and shift.

Choices the paper leaves open (written down here):
* t and aug_level are continuous in [0, 1]; the sinusoid takes ``1000 * value`` so
  its frequencies cover the same range as the usual 1000-step integer timesteps.
* Attention pooling uses learned query vectors (one per head group, averaged) over
  the LayerNorm'ed text tokens, with the key padding mask. A fully padded (dropped)
  prompt pools to zeros, so the projection's bias is the "no text" vector.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops


def sinusoidal_embedding(values: Tensor, dim: int, scale: float = 1000.0,
                         max_period: float = 10000.0) -> Tensor:
    """(B,) float values -> (B, dim) [cos | sin] features, computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) *
                      torch.arange(half, device=values.device, dtype=torch.float32) / half)
    args = values.float()[:, None] * scale * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ScalarEmbedding(nn.Module):
    """A scalar condition in [0, 1] (time or augmentation level) -> (B, emb_dim)."""

    def __init__(self, emb_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, values: Tensor) -> Tensor:
        feats = sinusoidal_embedding(values, self.freq_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class AttentionPool(nn.Module):
    """Attention pooling of a padded token sequence into one vector per sample.

    tokens (B, L, D) -> LayerNorm -> keys/values; ``num_heads`` learned queries attend
    over the valid tokens (ops.attention with the key padding mask); the heads'
    outputs are concatenated and projected to ``out_dim``.
    """

    def __init__(self, dim: int, out_dim: int, num_heads: int = 8):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AttentionPool: dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.randn(num_heads, self.head_dim) * dim ** -0.5)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, tokens: Tensor, mask: Optional[Tensor]) -> Tensor:
        b, l, d = tokens.shape
        kv = self.to_kv(self.norm(tokens))
        k, v = (t.contiguous() for t in
                kv.view(b, l, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0))
        q = self.query.to(k.dtype)[None, :, None, :].expand(b, -1, -1, -1)
        pooled = ops.attention(q.contiguous(), k, v, key_padding_mask=mask)   # (B, H, 1, Dh)
        return self.proj(pooled.reshape(b, d))
