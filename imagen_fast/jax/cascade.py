"""The cascade in JAX: a torch cascade checkpoint (``ImagenCascade.save``) loaded as
Flax models and sampled stage after stage, each stage's loop compiled once.

    cascade = JaxCascade.load("ckpt/")
    emb, mask = cascade.encode(["a red circle"], encoder="minilm")     # torch, on the host
    images = cascade.sample(emb, mask, key=jax.random.key(0))         # (B, H, W, 3) in [-1, 1]

Text: transformers 5 has no Flax text models, so embeddings come from the frozen
torch encoder run on the host or from a precomputed ``EmbeddingCache``
(``encoder="cache:<dir>"``); both give (B, L, D) arrays and (B, L) masks, padded here
to a fixed length so one compiled sampler serves every batch of prompts.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..core import SamplingConfig
from . import convert
from .diffusion import Diffusion, compile_sampler


class JaxCascade:
    def __init__(self, stages: List[Dict[str, Any]], text: Optional[Dict[str, Any]] = None):
        """stages as ``convert.load_cascade`` returns them (base stage first); ``text``
        the checkpoint's text-encoder entry ({"encoder", "max_length"}) when it has one."""
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        self.stages = stages
        self.text = text
        self.diffusions = [Diffusion(st["diffusion"]) for st in stages]
        self._compiled: Dict[Any, Any] = {}

    @classmethod
    def load(cls, path: str) -> "JaxCascade":
        from ..cascade import ImagenCascade

        return cls(convert.load_cascade(path), ImagenCascade.read_config(path).get("text"))

    @property
    def text_dim(self) -> Optional[int]:
        return self.stages[0]["model"].config.get("text_dim")

    def encode(self, prompts: Sequence[str], encoder: Optional[str] = None,
               max_length: Optional[int] = None):
        """Prompts -> (embeddings (B, max_length, D) float32, mask (B, max_length) bool)
        with a torch text encoder (or cache) on the host; by default the checkpoint's
        encoder (else "minilm") and its max_length (else 64)."""
        from ..text import get_text_encoder

        saved = self.text or {}
        encoder = encoder or saved.get("encoder", "minilm")
        max_length = max_length or saved.get("max_length", 64)
        enc = get_text_encoder(encoder, max_length=max_length) if isinstance(encoder, str) else encoder
        if self.text_dim is not None and enc.dim != self.text_dim:
            raise ValueError(f"encoder: {enc.name!r} gives {enc.dim}-d embeddings, the cascade "
                             f"takes text_dim={self.text_dim}")
        emb, mask = enc.encode(list(prompts))
        text, text_mask = convert.pad_text(emb, mask, max_length)
        return jnp.asarray(text), jnp.asarray(text_mask)

    def _sampler(self, i: int, batch: int, resolution: int, settings: Dict[str, Any]):
        key = (i, batch, resolution, tuple(sorted(settings.items())))
        if key not in self._compiled:
            self._compiled[key] = compile_sampler(
                self.stages[i]["model"], self.diffusions[i],
                shape=(batch, resolution, resolution, 3), **settings)
        return self._compiled[key]

    def sample(self, text_embeds, text_mask=None, *, key=None, num_stages: Optional[int] = None,
               sampling: Optional[Sequence[Optional[Dict[str, Any]]]] = None,
               resolutions: Optional[Sequence[Optional[int]]] = None, return_all: bool = False):
        """Images in [-1, 1], (B, H, W, 3), for text embeddings (B, L, text_dim); the
        arguments of ``ImagenCascade.sample`` (per-stage sampling overrides and output
        resolutions, ``return_all`` for every stage's images)."""
        text_embeds = jnp.asarray(text_embeds)
        if text_embeds.ndim != 3:
            raise ValueError(f"text_embeds must be (B, L, D), got shape {tuple(text_embeds.shape)}")
        if self.text_dim is not None and text_embeds.shape[-1] != self.text_dim:
            raise ValueError(f"text_embeds width {text_embeds.shape[-1]} != the cascade's "
                             f"text_dim {self.text_dim}")
        n = len(self.stages) if num_stages is None else int(num_stages)
        if not 1 <= n <= len(self.stages):
            raise ValueError(f"num_stages must be in [1, {len(self.stages)}], got {num_stages}")
        if text_mask is None:
            text_mask = jnp.ones(text_embeds.shape[:2], bool)
        key = jax.random.key(0) if key is None else key
        sampling, resolutions = list(sampling or []), list(resolutions or [])
        b = text_embeds.shape[0]
        outputs, images = [], None
        for i, st in enumerate(self.stages[:n]):
            cfg = SamplingConfig.from_dict(st["sampling"])
            if i < len(sampling) and sampling[i]:
                cfg = cfg.replace(**sampling[i])
            settings = cfg.to_dict()
            res = (resolutions[i] if i < len(resolutions) and resolutions[i]
                   else int(st["model"].config["image_size"]))
            run = self._sampler(i, b, res, settings)
            images = jnp.clip(run(jax.random.fold_in(key, i), text_embeds, text_mask,
                                  images if i else None), -1.0, 1.0)
            outputs.append(images)
        return outputs if return_all else images


def to_uint8(images) -> np.ndarray:
    """[-1, 1] (B, H, W, 3) -> uint8 numpy for PIL."""
    return np.asarray(jnp.round((jnp.clip(images, -1, 1) + 1) * 127.5)).astype(np.uint8)
