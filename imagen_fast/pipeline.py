"""Text to images with a trained cascade: ``load_pipeline`` and ``ImagenPipeline``.

    from imagen_fast import load_pipeline
    pipe = load_pipeline()                       # the small cascade shipped in the package
    images = pipe(["two red circles above a blue square"], num_images_per_prompt=4, seed=0)
    images[0].save("out.png")

``load_pipeline(path)`` opens any cascade directory written by ``ImagenCascade.save``
(config.json + model.safetensors) whose config names its frozen text encoder. Sampling
settings left as None take each stage's saved defaults; a single value applies to every
stage (``aug_level`` and a stage's low-res input only matter to super-resolution stages),
a list gives one value per stage (None entries keep that stage's default).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .cascade import ImagenCascade
from .core import SAMPLING_SETTINGS, SamplingConfig
from .data.transforms import to_pil
from .diffusion.step import CompileSpec, compile_options
from .text.base import check_prompts, parse_dtype

SHIPPED_CASCADE = Path(__file__).resolve().parent / "assets" / "shapes-cascade"

PerStage = Union[None, Any, Sequence[Any]]


def _per_stage(name: str, value: PerStage, n: int) -> List[Any]:
    if value is None:
        return [None] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: expected one value or {n} (one per stage), got {len(value)}")
        return list(value)
    return [value] * n


class ImagenPipeline:
    """A cascade plus its frozen text encoder: prompts in, PIL images (or tensors) out."""

    def __init__(self, cascade: ImagenCascade, text_encoder, device: torch.device,
                 compile: CompileSpec = "none"):
        if text_encoder.dim != cascade.text_dim:
            raise ValueError(f"text encoder {text_encoder.name!r} gives {text_encoder.dim}-d "
                             f"embeddings but the cascade expects text_dim={cascade.text_dim}")
        compile_options(compile)                  # ValueError naming "compile" when unknown
        self.cascade = cascade.eval()
        self.text_encoder = text_encoder
        self.device = device
        self.compile = compile

    @property
    def stage_names(self) -> List[str]:
        return [st.name for st in self.cascade.stages]

    def settings(self, **overrides) -> List[SamplingConfig]:
        """Each stage's SamplingConfig with the overrides of ``__call__`` applied (each a
        value for every stage or a list of one per stage; checked by SamplingConfig:
        ValueError names the setting)."""
        n = len(self.cascade.stages)
        unknown = set(overrides) - set(SAMPLING_SETTINGS)
        if unknown:
            raise ValueError(f"unknown sampling settings: {sorted(unknown)}")
        per = {name: _per_stage(name, overrides.get(name), n) for name in SAMPLING_SETTINGS}
        return [st.sampling.replace(**{k: v[i] for k, v in per.items() if v[i] is not None})
                for i, st in enumerate(self.cascade.stages)]

    @torch.no_grad()
    def __call__(self, prompts: Union[str, Sequence[str]], *, num_images_per_prompt: int = 1,
                 seed: Optional[int] = 0, generator: Optional[torch.Generator] = None,
                 guidance: PerStage = None, steps: PerStage = None, sampler: PerStage = None,
                 threshold: PerStage = None, percentile: PerStage = None,
                 aug_level: PerStage = None, eta: PerStage = None, start: PerStage = None,
                 num_stages: Optional[int] = None, progress: bool = False,
                 return_tensors: bool = False, on_stage=None):
        """Images for ``prompts``, ``num_images_per_prompt`` each, prompt-major order
        (all images of prompt 0, then prompt 1, ...). Returns PIL images, or with
        ``return_tensors`` the (N, 3, H, W) tensor in [-1, 1]. ``seed`` (or an explicit
        ``generator``) makes the result reproducible; ``on_stage(stage, seconds)`` is
        called as each stage finishes."""
        prompts = check_prompts(prompts)
        if not prompts:
            raise ValueError("prompts: need at least one prompt")
        for i, p in enumerate(prompts):
            if not p.strip():
                raise ValueError(f"prompts[{i}]: empty prompt")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: must be a positive integer, got {num_images_per_prompt!r}")
        configs = self.settings(guidance=guidance, steps=steps, sampler=sampler, threshold=threshold,
                                percentile=percentile, aug_level=aug_level, eta=eta, start=start)
        if generator is None:
            generator = torch.Generator(self.device)
            generator.manual_seed(0 if seed is None else int(seed))
        emb, mask = self.text_encoder.encode(prompts)
        emb = emb.repeat_interleave(num_images_per_prompt, dim=0).to(self.device)
        mask = mask.repeat_interleave(num_images_per_prompt, dim=0).to(self.device)
        images = self.cascade.sample(
            emb, mask, generator=generator, num_stages=num_stages,
            sampling=[c.to_dict() for c in configs],
            progress=progress, on_stage=on_stage, compile=self.compile)
        if return_tensors:
            return images
        return [to_pil(img.float().cpu()) for img in images]


def load_pipeline(path: Optional[Union[str, os.PathLike]] = None, device=None, dtype=None,
                  text_encoder=None, compile: CompileSpec = "none") -> ImagenPipeline:
    """Open the cascade at ``path`` (default: the one shipped in the package) on
    ``device`` (default: CUDA if available, else CPU) in ``dtype`` (default float32 on
    the CPU, bfloat16 on CUDA). ``text_encoder`` overrides the encoder named in the
    checkpoint (an object with ``encode``/``dim``, or a name for get_text_encoder).
    ``compile``: "none" (eager), "default", "reduce-overhead" (CUDA graphs on a GPU) or
    "max-autotune" (or a dict of torch.compile's mode/backend/options): every stage's
    whole guided denoising step becomes one compiled graph, compiled on the stage's
    first step (that call pays the compile time) and reused by every later step and
    call with the same batch size and settings."""
    from .text import get_text_encoder

    compile_options(compile)

    path = SHIPPED_CASCADE if path is None else Path(path)
    if path == SHIPPED_CASCADE and not (path / "model.safetensors").exists():
        raise ValueError(f"the shipped cascade is missing from this install ({path})")
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA was asked for but is not available")
    dtype = parse_dtype(dtype, device)
    cascade = ImagenCascade.load(str(path), device=device)
    cascade.to(dtype=dtype)
    if text_encoder is None or isinstance(text_encoder, str):
        text: Dict[str, Any] = dict(cascade.text or {})
        name = text_encoder or text.get("encoder")
        if not name:
            raise ValueError(f"{path}: the checkpoint names no text encoder (config 'text'); "
                             f"pass text_encoder=")
        kw = {"max_length": text["max_length"]} if "max_length" in text else {}
        text_encoder = get_text_encoder(name, **kw)
    return ImagenPipeline(cascade, text_encoder, device, compile=compile)
