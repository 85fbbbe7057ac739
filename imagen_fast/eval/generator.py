"""What the instruments sample from: any callable ``prompts -> PIL images``.

``Generator`` is the protocol: ``gen(prompts, *, seed=0, **settings) -> list[PIL.Image]``,
one image per prompt, deterministic for a given seed and batch. ``ImagenPipeline``
(``imagen_fast.load_pipeline``) is one; so is any function of that shape, e.g. a
wrapper around another model, or a folder of precomputed images.

A ``System`` is what an evaluation compares: a label, a generator and the settings it
is called with (``guidance``, ``steps``, ``sampler``, ``eta``, ``threshold``,
``percentile``, ``aug_level``: one value for every stage or a per-stage list, None for
the checkpoint's default; checked by the rules of ``SamplingConfig`` when the system is
made). ``parse_system("ckpt/ guidance=5 steps=32 label=w5")`` builds one from the
command line form.
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, runtime_checkable

from PIL import Image

from ..core import SAMPLING_SETTINGS as SETTINGS
from ..core import check_sampling_overrides
BUILTIN = "builtin"  # the small cascade shipped inside the package (load_pipeline(None))


@runtime_checkable
class Generator(Protocol):
    def __call__(self, prompts: List[str], *, seed: int = 0, **settings: Any) -> List[Image.Image]:
        ...


@dataclass
class System:
    label: str
    generator: Generator
    settings: Dict[str, Any] = field(default_factory=dict)
    spec: Optional[str] = None  # how it was built (a path and settings), for manifests

    def __post_init__(self):
        if not isinstance(self.label, str) or not self.label.strip():
            raise ValueError(f"label: expected a non-empty string, got {self.label!r}")
        if not callable(self.generator):
            raise TypeError(f"generator: expected a callable, got {type(self.generator).__name__}")
        unknown = set(self.settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"settings: unknown {sorted(unknown)}; known: {list(SETTINGS)}")
        check_sampling_overrides(self.settings)

    def generate(self, prompts: List[str], seed: int) -> List[Image.Image]:
        images = self.generator(list(prompts), seed=seed, **self.settings)
        images = list(images)
        if len(images) != len(prompts):
            raise ValueError(f"system {self.label!r} returned {len(images)} images for "
                             f"{len(prompts)} prompts")
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"system {self.label!r}: image {i} is a {type(im).__name__}, "
                                f"not a PIL image")
        return [im.convert("RGB") for im in images]

    def describe(self) -> Dict[str, Any]:
        return {"label": self.label, "spec": self.spec, "settings": self.settings}


def with_settings(system: System, label: str, **settings) -> System:
    """The same generator with some settings replaced (the guidance sweep's points)."""
    merged = {**system.settings, **settings}
    return System(label, system.generator, merged, spec=system.spec)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_system(spec: str, *, device=None, dtype=None, loader=None) -> System:
    """``"PATH [key=value ...] [label=NAME]"`` -> System. PATH is a cascade directory or
    ``builtin``; values are JSON where they parse (``guidance=[1.35,8]``, ``steps=32``),
    strings otherwise. ``loader(path, device, dtype)`` defaults to ``load_generator``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"system: expected 'PATH [key=value ...]', got {spec!r}")
    tokens = shlex.split(spec)
    path, settings, label = tokens[0], {}, None
    for tok in tokens[1:]:
        key, eq, value = tok.partition("=")
        if not eq:
            raise ValueError(f"system {spec!r}: {tok!r} is not key=value")
        if key == "label":
            label = value
        elif key in SETTINGS:
            settings[key] = _parse_value(value)
        else:
            raise ValueError(f"system {spec!r}: unknown setting {key!r}; known: "
                             f"{', '.join(SETTINGS)}, label")
    gen = (loader or load_generator)(None if path == BUILTIN else path, device, dtype)
    if label is None:
        label = os.path.basename(os.path.normpath(path)) or path
        if settings:
            label += " " + " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
    return System(label, gen, settings, spec=spec)


def load_generator(path: Optional[str], device=None, dtype=None) -> Generator:
    """The sampling pipeline (``imagen_fast.load_pipeline``) of a cascade directory
    (config.json + model.safetensors); ``None`` for the small cascade shipped with the
    package. Missing files raise FileNotFoundError naming them."""
    if path is not None:
        for name in ("config.json", "model.safetensors"):
            f = os.path.join(path, name)
            if not os.path.isfile(f):
                raise FileNotFoundError(f"cascade checkpoint file not found: {f}")
    from imagen_fast.pipeline import load_pipeline
    return load_pipeline(path, device=device, dtype=dtype)
