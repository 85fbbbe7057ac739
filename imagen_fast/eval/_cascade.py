"""Sampling a saved cascade where ``imagen_fast.load_pipeline`` is not available.

A Generator over ``ImagenCascade`` + the frozen text encoder named by the checkpoint's
``config["text"]`` (``{"encoder": "hash:32", "max_length": 32}``), with the pipeline's
settings (one value or a per-stage list; None keeps the stage's default).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from PIL import Image

from imagen_fast.pipeline import ImagenCascade
from imagen_fast.text import get_text_encoder, parse_dtype

# the pipeline's setting name -> SamplingConfig field
_FIELDS = {"guidance": "guidance_scale", "steps": "steps", "sampler": "sampler",
           "threshold": "threshold", "percentile": "percentile", "aug_level": "aug_level"}


def tensor_to_pil(images: torch.Tensor) -> List[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in x]


class CascadeGenerator:
    def __init__(self, cascade: ImagenCascade, text_encoder, device=None):
        self.cascade = cascade.eval()
        self.text_encoder = get_text_encoder(text_encoder) if isinstance(text_encoder, str) \
            else text_encoder
        self.device = torch.device(device) if device is not None else \
            next(cascade.parameters()).device

    @classmethod
    def load(cls, path: str, device=None, dtype=None) -> "CascadeGenerator":
        config = ImagenCascade.read_config(path)
        text = config.get("text")
        if not text or "encoder" not in text:
            raise ValueError(f"{path}/config.json names no text encoder (a 'text' entry such "
                             f"as {{\"encoder\": \"minilm\"}})")
        kw = {k: v for k, v in text.items() if k != "encoder"}
        cascade = ImagenCascade.load(path, device=device)
        if dtype is not None:
            cascade = cascade.to(parse_dtype(dtype, torch.device(device or "cpu")))
        return cls(cascade, get_text_encoder(text["encoder"], **kw), device=device)

    def _per_stage(self, settings: Dict[str, Any]) -> List[Optional[Dict[str, Any]]]:
        n = len(self.cascade.stages)
        out: List[Dict[str, Any]] = [{} for _ in range(n)]
        for key, value in settings.items():
            if value is None:
                continue
            if key not in _FIELDS:
                raise ValueError(f"unknown setting {key!r}; known: {sorted(_FIELDS)}")
            values: Sequence = value if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise ValueError(f"{key}: got {len(values)} values for {n} stages")
            for i, v in enumerate(values):
                if v is not None:
                    out[i][_FIELDS[key]] = v
        return [d or None for d in out]

    @torch.no_grad()
    def __call__(self, prompts: List[str], *, seed: int = 0, **settings) -> List[Image.Image]:
        if not prompts:
            return []
        emb, mask = self.text_encoder.encode(list(prompts))
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        dtype = next(self.cascade.parameters()).dtype
        images = self.cascade.sample(emb.to(self.device, dtype), mask.to(self.device),
                                     generator=gen, sampling=self._per_stage(settings))
        return tensor_to_pil(images)
