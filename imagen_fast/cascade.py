"""The Imagen cascade: text embeddings -> base 64x64 -> 256x256 -> 1024x1024.

An ``ImagenCascade`` holds one ``Stage`` per model: the U-Net, its
``GaussianDiffusion`` (schedule, prediction, text dropout, noise augmentation) and its
sampling settings (sampler, steps, guidance weight, threshold and percentile,
augmentation level). Every stage sees the same frozen text embeddings; each
super-resolution stage is conditioned on the previous stage's output.

Checkpoints are a directory with ``config.json`` (every stage's U-Net, diffusion and
sampling config, and the frozen text encoder the stages were trained with:
``"text": {"encoder": "minilm", "max_length": 32}``) and ``model.safetensors`` (weights as ``stages.<i>.<param>``; the
config is repeated in its metadata). No pickle anywhere. ``ImagenCascade.load``
rebuilds the models from the config; ``load_weights`` loads into an existing cascade
and refuses a checkpoint of another architecture, naming the mismatch.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import SamplingConfig
from .diffusion import GaussianDiffusion, sample
from .diffusion.step import CompileSpec, compile_options
from .models import build_unet, unet_from_config

FORMAT = "imagen-fast-cascade"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class Stage:
    name: str
    unet: nn.Module
    diffusion: GaussianDiffusion
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    @property
    def is_sr(self) -> bool:
        return self.unet.config["stage"] == "sr"

    @property
    def resolution(self) -> int:
        return int(self.unet.config["image_size"])

    @property
    def lowres_resolution(self) -> Optional[int]:
        return self.unet.config.get("lowres_size")

    def config(self) -> Dict[str, Any]:
        return dict(name=self.name, unet=copy.deepcopy(self.unet.config),
                    diffusion=self.diffusion.config(), sampling=self.sampling.to_dict())


def make_lowres(images: Tensor, size: int) -> Tensor:
    """Area-downsample images to size x size (the SR stages' training condition)."""
    return F.interpolate(images.float(), size=(size, size), mode="area").to(images.dtype)


def default_stage(name: str, preset: str, **unet_overrides) -> Stage:
    """A stage with the paper's defaults: cosine schedule for the base and 64->256
    models, linear betas for 256->1024 (and small presets of its architecture); noise
    augmentation for SR; guidance 1.35 (base) and 8.0 (SR), the paper's COCO settings."""
    unet = build_unet(preset, **unet_overrides)
    sr = unet.config["stage"] == "sr"
    # the 256->1024 architecture (an SR U-Net without self-attention) gets linear betas
    no_self_attn = sr and not any(unet.config.get("self_attention", [True]))
    schedule = "linear" if no_self_attn else "cosine"
    diffusion = GaussianDiffusion(schedule, prediction="eps", cond_drop_prob=0.1, noise_aug=sr)
    sampling = SamplingConfig(guidance=8.0 if sr else 1.35)
    return Stage(name, unet, diffusion, sampling)


class ImagenCascade(nn.Module):
    def __init__(self, stages: Sequence[Stage], text: Optional[Dict[str, Any]] = None):
        """``text``: the frozen encoder the stages expect, ``{"encoder": name for
        imagen_fast.text.get_text_encoder, "max_length": tokens}`` (None = unknown: the
        caller supplies embeddings)."""
        super().__init__()
        stages = list(stages)
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        if stages[0].is_sr:
            raise ValueError(f"the first stage must be a base (text -> image) model, "
                             f"got super-resolution stage {stages[0].name!r}")
        for prev, st in zip(stages, stages[1:]):
            if not st.is_sr:
                raise ValueError(f"stage {st.name!r} follows {prev.name!r} but is not a "
                                 f"super-resolution model")
        text_dims = {st.unet.config.get("text_dim") for st in stages}
        if len(text_dims) != 1:
            raise ValueError(f"every stage must take the same text width, got "
                             f"{[(st.name, st.unet.config.get('text_dim')) for st in stages]}")
        if text is not None:
            if not isinstance(text, dict) or not isinstance(text.get("encoder"), str):
                raise ValueError(f"text must be a dict with an 'encoder' name, got {text!r}")
            unknown = set(text) - {"encoder", "max_length"}
            if unknown:
                raise ValueError(f"text: unknown keys {sorted(unknown)}")
        self.stages = stages
        self.text = copy.deepcopy(text)
        self.unets = nn.ModuleList(st.unet for st in stages)

    # --------------------------------------------------------------- building
    @classmethod
    def from_presets(cls, presets: Sequence[str] = ("base64", "sr256", "sr1024"),
                     names: Optional[Sequence[str]] = None, **unet_overrides) -> "ImagenCascade":
        names = list(names) if names is not None else [
            f"stage{i}_{p}" for i, p in enumerate(presets)]
        if len(names) != len(presets):
            raise ValueError(f"got {len(names)} stage names for {len(presets)} presets")
        return cls([default_stage(n, p, **unet_overrides) for n, p in zip(names, presets)])

    @property
    def text_dim(self) -> Optional[int]:
        return self.stages[0].unet.config.get("text_dim")

    def stage(self, key: Union[int, str]) -> Stage:
        if isinstance(key, int):
            return self.stages[key]
        for st in self.stages:
            if st.name == key:
                return st
        raise KeyError(f"no stage named {key!r}; stages: {[st.name for st in self.stages]}")

    # --------------------------------------------------------------- training
    def loss(self, stage: Union[int, str], images: Tensor, text_embeds: Optional[Tensor] = None,
             text_mask: Optional[Tensor] = None, *, generator: Optional[torch.Generator] = None
             ) -> Tensor:
        """Training loss of one stage on clean images in [-1, 1] at that stage's
        resolution (or crops of it: the SR models are convolutional). SR stages get the
        images area-downsampled by the stage's factor as their low-res condition."""
        st = self.stage(stage)
        lowres = None
        if st.is_sr:
            factor = st.resolution // st.lowres_resolution
            lowres = make_lowres(images, images.shape[-1] // factor)
        return st.diffusion.loss(st.unet, images, text_embeds, text_mask, lowres,
                                 generator=generator)

    # --------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, text_embeds: Tensor, text_mask: Optional[Tensor] = None, *,
               generator: Optional[torch.Generator] = None, num_stages: Optional[int] = None,
               sampling: Optional[Sequence[Optional[Dict[str, Any]]]] = None,
               resolutions: Optional[Sequence[Optional[int]]] = None,
               return_all: bool = False, progress: bool = False,
               on_stage=None, compile: CompileSpec = "none") -> Union[Tensor, List[Tensor]]:
        """Generate images in [-1, 1] for a batch of text embeddings (B, L, text_dim).

        sampling: per-stage dicts overriding that stage's SamplingConfig (e.g.
        ``[{"guidance": 3}, None, {"steps": 16}]``). resolutions: per-stage output
        sizes overriding the U-Net's nominal one (e.g. a 64->256-trained 256->1024
        model run on whole images). Returns the last stage's images, or every
        stage's with ``return_all``. ``progress`` shows a bar per stage (tqdm);
        ``on_stage(stage, seconds)`` is called as each stage finishes. ``compile``: each
        stage's guided step as one torch.compile graph (``imagen_fast.diffusion.sample``),
        compiled at the stage's first step and kept for later calls with the same settings.
        """
        import time
        if text_embeds.ndim != 3:
            raise ValueError(f"text_embeds must be (B, L, D), got shape {tuple(text_embeds.shape)}")
        if self.text_dim is not None and text_embeds.shape[-1] != self.text_dim:
            raise ValueError(f"text_embeds width {text_embeds.shape[-1]} != the cascade's "
                             f"text_dim {self.text_dim}")
        n = len(self.stages) if num_stages is None else int(num_stages)
        if not 1 <= n <= len(self.stages):
            raise ValueError(f"num_stages must be in [1, {len(self.stages)}], got {num_stages}")
        compile_options(compile)                         # a bad mode fails before any stage runs
        sampling = list(sampling or [])
        resolutions = list(resolutions or [])
        b = text_embeds.shape[0]
        configs = [st.sampling.replace(**sampling[i]) if i < len(sampling) and sampling[i]
                   else st.sampling for i, st in enumerate(self.stages[:n])]
        for st, cfg in zip(self.stages, configs):       # before any stage runs
            if cfg.start < 1.0 and not st.is_sr:
                raise ValueError(f"start: stage {st.name!r} is a base stage, which starts from "
                                 f"pure noise (start 1); got {cfg.start}")
        outputs: List[Tensor] = []
        images: Optional[Tensor] = None
        for i, (st, cfg) in enumerate(zip(self.stages, configs)):
            res = resolutions[i] if i < len(resolutions) and resolutions[i] else st.resolution
            lowres = None
            if st.is_sr:
                lowres = images
            device = next(st.unet.parameters()).device
            bar = _stage_bar(st.name, cfg.steps) if progress else None
            t0 = time.perf_counter()
            images = sample(
                st.unet, st.diffusion, (b, 3, res, res),
                text_embeds=text_embeds.to(device),
                text_mask=None if text_mask is None else text_mask.to(device),
                lowres=None if lowres is None else lowres.to(device),
                aug_level=cfg.aug_level, guidance=cfg.guidance,
                sampler=cfg.sampler, steps=cfg.steps, eta=cfg.eta, threshold=cfg.threshold,
                percentile=cfg.percentile, generator=generator, device=device,
                dtype=next(st.unet.parameters()).dtype,
                on_step=None if bar is None else (lambda done, total, bar=bar: bar.update(1)),
                compile=compile, start=cfg.start,
            ).clamp(-1.0, 1.0)
            if bar is not None:
                bar.close()
            if on_stage is not None:
                on_stage(st, time.perf_counter() - t0)
            outputs.append(images)
        return outputs if return_all else images

    # ---------------------------------------------------------- serialisation
    def config(self) -> Dict[str, Any]:
        out = dict(format=FORMAT, version=FORMAT_VERSION,
                   stages=[st.config() for st in self.stages])
        if self.text is not None:
            out["text"] = copy.deepcopy(self.text)
        return out

    def state_tensors(self) -> Dict[str, Tensor]:
        out = {}
        for i, st in enumerate(self.stages):
            for k, v in st.unet.state_dict().items():
                out[f"stages.{i}.{k}"] = v.detach().contiguous().cpu()
        return out

    def save(self, path: str, dtype: Optional[torch.dtype] = None) -> None:
        """Write ``path/config.json`` and ``path/model.safetensors`` (weights cast to
        ``dtype`` when given, e.g. torch.float16 to halve the file)."""
        from safetensors.torch import save_file

        tensors = self.state_tensors()
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        write_checkpoint(path, self.config(), lambda file, meta: save_file(tensors, file, metadata=meta))

    @staticmethod
    def read_config(path: str) -> Dict[str, Any]:
        """The checkpoint's config; ValueError (naming the path) when ``path`` is not a
        cascade checkpoint."""
        file = os.path.join(path, CONFIG_NAME)
        if not os.path.isdir(path):
            raise ValueError(f"{path}: not a cascade checkpoint (no such directory)")
        if not os.path.isfile(file) or not os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            raise ValueError(f"{path}: not a cascade checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            with open(file) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read {CONFIG_NAME}: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path}: {CONFIG_NAME} is not a JSON object")
        if config.get("format") != FORMAT:
            raise ValueError(f"{path}: not an {FORMAT} checkpoint (format={config.get('format')!r})")
        if config.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: checkpoint format version {config.get('version')} is not "
                             f"supported (this code reads version {FORMAT_VERSION})")
        return config

    @classmethod
    def from_config(cls, config: Dict[str, Any], device=None) -> "ImagenCascade":
        if not isinstance(config.get("stages"), list) or not config["stages"]:
            raise ValueError("cascade config has no 'stages' list")
        stages = []
        for sc in config["stages"]:
            missing = [k for k in ("name", "unet", "diffusion", "sampling") if k not in sc]
            if missing:
                raise ValueError(f"cascade config stage {sc.get('name', '?')!r} lacks {missing}")
            unet = unet_from_config(sc["unet"], device=device)
            stages.append(Stage(sc["name"], unet, GaussianDiffusion.from_config(sc["diffusion"]),
                                SamplingConfig.from_dict(sc["sampling"])))
        return cls(stages, text=config.get("text"))

    @classmethod
    def load(cls, path: str, device=None) -> "ImagenCascade":
        """Rebuild the cascade described by ``path/config.json`` and load its weights."""
        cascade = cls.from_config(cls.read_config(path), device=device)
        cascade.load_weights(path)
        return cascade

    def load_weights(self, path: str) -> None:
        """Load ``path``'s weights into this cascade. Raises ValueError naming the first
        differences when the checkpoint is of another architecture (stage count, U-Net
        config, missing/unexpected parameters, shapes). Sampling settings are kept."""
        from safetensors import safe_open

        config = self.read_config(path)
        problems = _config_mismatches(config, self.config())
        weights = os.path.join(path, WEIGHTS_NAME)
        with safe_open(weights, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            own = {f"stages.{i}.{k}": v for i, st in enumerate(self.stages)
                   for k, v in st.unet.state_dict().items()}
            missing = sorted(set(own) - keys)
            unexpected = sorted(keys - set(own))
            if missing:
                problems.append(f"{len(missing)} parameter(s) missing from the checkpoint, "
                                f"e.g. {missing[:3]}")
            if unexpected:
                problems.append(f"{len(unexpected)} unexpected parameter(s) in the checkpoint, "
                                f"e.g. {unexpected[:3]}")
            shapes = []
            for k in sorted(keys & set(own)):
                shape = tuple(f.get_slice(k).get_shape())
                if shape != tuple(own[k].shape):
                    shapes.append(f"{k}: checkpoint {shape} vs model {tuple(own[k].shape)}")
            if shapes:
                problems.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:3]))
            if problems:
                raise ValueError(f"checkpoint {path} does not fit this cascade: "
                                 + " | ".join(problems))
            with torch.no_grad():
                for k, v in own.items():
                    v.copy_(f.get_tensor(k))


def write_checkpoint(path: str, config: Dict[str, Any], save_weights) -> None:
    """Write a cascade checkpoint directory: ``config.json`` and the safetensors weights
    (``save_weights(file, metadata)`` writes them; the config goes in the metadata too),
    each under a temporary name renamed into place, so a reader never sees half a file."""
    os.makedirs(path, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True)
    tmp_cfg = os.path.join(path, CONFIG_NAME + ".tmp")
    tmp_w = os.path.join(path, WEIGHTS_NAME + ".tmp")
    with open(tmp_cfg, "w") as f:
        f.write(text + "\n")
    save_weights(tmp_w, {"format": FORMAT, "config": text})
    os.replace(tmp_w, os.path.join(path, WEIGHTS_NAME))
    os.replace(tmp_cfg, os.path.join(path, CONFIG_NAME))


def _stage_bar(name: str, total: int):
    try:
        from tqdm import tqdm
    except ImportError:                                   # tqdm is a dependency; be lenient
        return None
    return tqdm(total=total, desc=name, unit="step", leave=False, dynamic_ncols=True)


def _config_mismatches(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    problems = []
    s_st, c_st = saved.get("stages", []), current["stages"]
    if len(s_st) != len(c_st):
        problems.append(f"checkpoint has {len(s_st)} stage(s), the cascade {len(c_st)}")
    for i, (a, b) in enumerate(zip(s_st, c_st)):
        ua, ub = a.get("unet", {}), b["unet"]
        diffs = [f"{k}={ua.get(k)!r} (checkpoint) vs {ub.get(k)!r} (model)"
                 for k in sorted(set(ua) | set(ub))
                 if k not in ("name", "use_checkpoint") and ua.get(k) != ub.get(k)]
        if diffs:
            problems.append(f"stage {i} ({b['name']!r}) U-Net config differs: " + ", ".join(diffs))
    return problems
