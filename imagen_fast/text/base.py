"""The text-encoder interface every conditioning source implements.

``encode(prompts) -> (embeddings (B, L, D) float, mask (B, L) bool)``

* ``L`` is the longest tokenized prompt in the batch (``pad_to_max_length=False``, the
  default) or exactly ``max_length`` (``pad_to_max_length=True``); prompts longer than
  ``max_length`` tokens are truncated.
* ``mask[b, l]`` is True for a real token, False for padding; padded embedding rows are
  zero (so two encoders, or an encoder and the cache, agree exactly on padding).
* ``dim`` is ``D``; ``name`` is a canonical string that ``get_text_encoder(name)`` accepts
  and that the embedding cache stores to refuse a mismatched encoder.

Encoders are frozen: no parameter requires grad, the module is in eval mode, and encoding
runs under ``torch.inference_mode``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

Prompts = Union[str, Sequence[str]]

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """'bf16' / 'fp16' / 'fp32' / a torch.dtype / 'auto' or None (bf16 on CUDA, fp32 on CPU,
    where reduced-precision matmuls are slower and less accurate)."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype: expected one of bf16, fp16, fp32, auto; got {dtype!r}")


def check_prompts(prompts: Prompts) -> List[str]:
    """A list of strings from a string or a sequence of strings; TypeError otherwise."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts: expected a string or a sequence of strings, got {type(prompts).__name__}")
    out = list(prompts)
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}]: expected str, got {type(p).__name__}")
    return out


class TextEncoder:
    """Base class: subclasses set ``name``, ``dim``, ``max_length`` and implement
    ``_encode_batch(list_of_str) -> (emb (B, L, D), mask (B, L) bool)`` with L <= max_length
    and padded rows of any value (they are zeroed here)."""

    name: str = "?"
    dim: int = 0
    max_length: int = 0
    batch_size: int = 64
    output_dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    def _encode_batch(self, prompts: List[str]) -> Tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def encode(self, prompts: Prompts, *, pad_to_max_length: bool = False) -> Tuple[Tensor, Tensor]:
        prompts = check_prompts(prompts)
        if not prompts:
            L = self.max_length if pad_to_max_length else 0
            return (torch.zeros(0, L, self.dim, dtype=self.output_dtype, device=self.device),
                    torch.zeros(0, L, dtype=torch.bool, device=self.device))
        embs, masks = [], []
        with torch.inference_mode():
            for i in range(0, len(prompts), self.batch_size):
                e, m = self._encode_batch(prompts[i:i + self.batch_size])
                embs.append(e.to(self.output_dtype))
                masks.append(m.to(torch.bool))
        L = self.max_length if pad_to_max_length else max(m.shape[1] for m in masks)
        emb = torch.zeros(len(prompts), L, self.dim, dtype=self.output_dtype, device=self.device)
        mask = torch.zeros(len(prompts), L, dtype=torch.bool, device=self.device)
        row = 0
        for e, m in zip(embs, masks):
            n, length = m.shape
            mask[row:row + n, :length] = m
            emb[row:row + n, :length] = e * m[..., None].to(e.dtype)
            row += n
        return emb, mask  # allocated outside inference_mode: ordinary tensors

    __call__ = encode

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, max_length={self.max_length})"
