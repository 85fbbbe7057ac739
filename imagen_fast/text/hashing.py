"""A dependency-free toy encoder for tests and smoke runs: each whitespace token maps to a
fixed random vector (seeded by a stable hash of the token) plus a sinusoidal position code.

It carries no meaning, but it is deterministic across processes and machines, distinguishes
word order, and costs microseconds: use it where a test needs text conditioning of the right
shape without importing transformers. Name: ``"hash"`` or ``"hash:<dim>"``.
"""
from __future__ import annotations

import math
import zlib
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from .base import TextEncoder


class HashTextEncoder(TextEncoder):
    def __init__(self, dim: int = 64, *, max_length: int = 64, device="cpu",
                 output_dtype: torch.dtype = torch.float32, batch_size: int = 256):
        if not isinstance(dim, int) or dim < 2:
            raise ValueError(f"dim: expected an int >= 2, got {dim!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length: expected a positive int, got {max_length!r}")
        self.dim, self.max_length, self.batch_size = dim, max_length, batch_size
        self.device, self.output_dtype = torch.device(device), output_dtype
        self.name = f"hash:{dim}"
        self._table: Dict[str, Tensor] = {}
        half = dim // 2
        pos = torch.arange(max_length, dtype=torch.float64)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / max(half, 1))
        pe = torch.zeros(max_length, dim, dtype=torch.float64)
        pe[:, :half] = torch.sin(pos * freq)
        pe[:, half:2 * half] = torch.cos(pos * freq)
        self._pos = (0.1 * pe).float()

    def _vec(self, token: str) -> Tensor:
        v = self._table.get(token)
        if v is None:
            g = torch.Generator().manual_seed(zlib.crc32(token.encode("utf-8")))
            v = torch.randn(self.dim, generator=g)
            self._table[token] = v
        return v

    def tokenize(self, prompt: str) -> List[str]:
        # an end token, as BERT/T5 tokenizers add, so an empty prompt still has one token
        return (prompt.lower().split() + ["</s>"])[: self.max_length]

    def _encode_batch(self, prompts: List[str]) -> Tuple[Tensor, Tensor]:
        toks = [self.tokenize(p) for p in prompts]
        L = max(len(t) for t in toks)
        emb = torch.zeros(len(prompts), L, self.dim)
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        for i, t in enumerate(toks):
            emb[i, :len(t)] = torch.stack([self._vec(w) for w in t]) + self._pos[:len(t)]
            mask[i, :len(t)] = True
        return emb.to(self.device), mask.to(self.device)
