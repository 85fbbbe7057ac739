"""Imagen's U-Nets in Flax NNX, built from the same presets and configs as the torch
models (``imagen_fast.models.presets``): ``build_unet("tiny-base32")`` here and there
give the same architecture, parameter for parameter."""
from __future__ import annotations

import copy
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...models.presets import model_kwargs, preset_config
from .layers import Conv2d, ConvTranspose2d, GroupNormAct, LayerNorm, Linear
from .unet import AttentionBlock, BaseUNet, EfficientUNet, ResBlock, resize_bilinear

ARCHS = {"base": BaseUNet, "efficient": EfficientUNet}


def unet_from_config(config: Dict[str, Any], *, seed: int = 0, dtype=jnp.float32):
    """A Flax U-Net from a config dict (``model.config`` of the torch model, or a
    checkpoint's stage config), parameters initialised from ``seed``. ``dtype`` is the
    compute dtype (parameters stay float32)."""
    arch = config.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"config 'arch' must be one of {sorted(ARCHS)}, got {arch!r}")
    try:
        model = ARCHS[arch](**model_kwargs(config), dtype=dtype, rng=np.random.default_rng(seed))
    except TypeError as e:
        raise ValueError(f"bad U-Net config for arch {arch!r}: {e}") from None
    model.config = copy.deepcopy(config)
    return model


def build_unet(name: str, *, seed: int = 0, dtype=jnp.float32, **overrides):
    """A preset U-Net by name (overrides as ``imagen_fast.models.build_unet``)."""
    return unet_from_config(preset_config(name, **overrides), seed=seed, dtype=dtype)


def count_parameters(model) -> int:
    return sum(p.size for p in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


__all__ = ["ARCHS", "AttentionBlock", "BaseUNet", "Conv2d", "ConvTranspose2d", "EfficientUNet",
           "GroupNormAct", "LayerNorm", "Linear", "ResBlock", "build_unet", "count_parameters",
           "resize_bilinear", "unet_from_config"]
