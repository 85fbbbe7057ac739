"""U-Net presets by name: the paper's three models and small ones for tests and demos.

``build_unet(name, **overrides)`` builds a preset (channels_last, float32, on ``device``);
``unet_from_config(config)`` rebuilds any model from its ``model.config`` dict (what a
checkpoint stores); ``describe_presets()`` lists name, stage, resolution and exact
parameter count, counted on the meta device (no memory, instant).

Paper sizes (text_dim 4096 = T5-XXL):
* "base64": F.1, ADM U-Net, 512 channels x [1, 2, 3, 4], 3 res blocks, attention at
  32/16/8 with 64 channels per head ("about 2B").
* "sr256": F.2, Efficient U-Net 64->256, channels 128/256/512/1024, res blocks
  2/4/8/8, self-attention (8 heads) with text only in the 1024-channel level ("600M").
  The attention layer follows every ResBlock of that level (ADM's reading of
  "attention at a resolution"); one layer per block would give 483M, far from 600M.
* "sr1024": F.3, the same blocks without self-attention, text cross-attention at the
  1024-channel level, once per block ("400M"; this reading gives 479M: the paper does
  not list what makes its SR models differ by 200M beyond the attention layers).
Conditioning widths the paper does not give: emb_dim (FiLM input) 4x the first
level's channels, text projected to context_dim before the attention layers.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Dict, List

import torch

from .unet import BaseUNet, EfficientUNet

ARCHS = {"base": BaseUNet, "efficient": EfficientUNet}

# stage: "base" (text -> image) or "sr" (low-res image + text -> image)
PRESETS: Dict[str, Dict[str, Any]] = {
    "base64": dict(
        arch="base", stage="base", image_size=64, model_channels=512, channel_mult=[1, 2, 3, 4],
        num_res_blocks=3, attn_resolutions=[32, 16, 8], head_dim=64, text_dim=4096,
        context_dim=1024, emb_dim=2048),
    "sr256": dict(
        arch="efficient", stage="sr", image_size=256, lowres_size=64,
        channels=[128, 256, 512, 1024], num_res_blocks=[2, 4, 8, 8],
        self_attention=[False, False, False, True], cross_attention=[False] * 4, num_heads=8,
        attn_every_res_block=True, text_dim=4096, context_dim=1024, emb_dim=1024),
    "sr1024": dict(
        arch="efficient", stage="sr", image_size=1024, lowres_size=256,
        channels=[128, 256, 512, 1024], num_res_blocks=[2, 4, 8, 8],
        self_attention=[False] * 4, cross_attention=[False, False, False, True], num_heads=8,
        text_dim=4096, context_dim=1024, emb_dim=1024),
    # ~20M base model at 64x64 for benchmarks (attention at 16 and 8 px, as the
    # imagen-pytorch configuration it is compared against).
    "base64-small": dict(
        arch="base", stage="base", image_size=64, model_channels=64, channel_mult=[1, 2, 2, 4],
        num_res_blocks=2, attn_resolutions=[16, 8], head_dim=64, text_dim=512,
        context_dim=256, emb_dim=256),
    # ~22M Efficient U-Net used as a base (text -> 64x64) model: the benchmark's
    # counterpart of imagen-pytorch's memory_efficient Unet (attention at 16 and 8 px).
    "base64-small-efficient": dict(
        arch="efficient", stage="base", image_size=64, channels=[64, 128, 192, 256],
        num_res_blocks=[1, 2, 4, 4], self_attention=[False, True, True, False],
        cross_attention=[False] * 4, num_heads=None, head_dim=64, text_dim=512,
        context_dim=256, emb_dim=256),
    # Tiny models for tests and the CPU demo cascade 32 -> 64 -> 128.
    "tiny-base32": dict(
        arch="base", stage="base", image_size=32, model_channels=32, channel_mult=[1, 2],
        num_res_blocks=1, attn_resolutions=[16], head_dim=16, text_dim=32, context_dim=32,
        emb_dim=64, groups=8, pool_heads=4),
    "tiny-sr64": dict(
        arch="efficient", stage="sr", image_size=64, lowres_size=32, channels=[16, 32, 64],
        num_res_blocks=[1, 1, 2], self_attention=[False, False, True],
        cross_attention=[False] * 3, num_heads=4, text_dim=32, context_dim=32, emb_dim=64,
        groups=8, pool_heads=4),
    "tiny-sr128": dict(
        arch="efficient", stage="sr", image_size=128, lowres_size=64, channels=[16, 32, 64],
        num_res_blocks=[1, 1, 2], self_attention=[False] * 3,
        cross_attention=[False, False, True], num_heads=4, text_dim=32, context_dim=32,
        emb_dim=64, groups=8, pool_heads=4),
    # The shipped cascade (imagen_fast/assets/shapes-cascade): 32 px base -> 64 px SR on the
    # synthetic shapes data, conditioned on all-MiniLM-L6-v2 (text_dim 384). Efficient
    # U-Nets both: the base runs its levels at 16/8/4 px with text self-attention at 8 and
    # 4 px (where layout, count and position are decided); ~10M parameters in all, so the
    # fp16 weights stay under 25 MB and 4 guided images sample in seconds on a CPU.
    "shapes-base32": dict(
        arch="efficient", stage="base", image_size=32, channels=[48, 96, 192],
        num_res_blocks=[1, 2, 3], self_attention=[False, True, True],
        cross_attention=[False] * 3, num_heads=None, head_dim=32, text_dim=384,
        context_dim=128, emb_dim=256, groups=16, pool_heads=4),
    "shapes-sr64": dict(
        arch="efficient", stage="sr", image_size=64, lowres_size=32, channels=[32, 64, 128],
        num_res_blocks=[1, 2, 3], self_attention=[False, False, True],
        cross_attention=[False] * 3, num_heads=4, text_dim=384, context_dim=128, emb_dim=128,
        groups=8, pool_heads=4),
    # The cascade's third stage, 64 -> 256 px, built as the paper's 256->1024 model: no
    # self-attention, text cross-attention in the lowest-resolution block, trained on
    # aligned crops (64 px of 256) and sampled on whole images. Levels at 128/64/32/16 px;
    # little at full resolution (16 channels: the input conv, the last transposed conv and
    # the output conv only). 6.2M parameters (12.4 MB fp16); sized so that 4 images x ~20
    # steps at 256 px (guidance 1) take well under 10 s on a 2-core CPU.
    "shapes-sr256": dict(
        arch="efficient", stage="sr", image_size=256, lowres_size=64, init_channels=16,
        channels=[16, 48, 96, 192], num_res_blocks=[1, 1, 2, 3], self_attention=[False] * 4,
        cross_attention=[False, False, False, True], num_heads=4, text_dim=384,
        context_dim=128, emb_dim=128, groups=8, pool_heads=4),
}

# Config keys that describe the model without being constructor arguments. "train_size":
# the side of the crops a stage was trained on (imagen_fast.train sets it), when it
# differs from image_size, the side the stage samples at.
_META_KEYS = ("arch", "stage", "lowres_size", "train_size")


def model_kwargs(config: Dict[str, Any]) -> Dict[str, Any]:
    """The constructor arguments of a U-Net (torch or Flax) from its config dict."""
    kwargs = {k: v for k, v in config.items() if k not in _META_KEYS + ("name",)}
    if config["arch"] == "efficient":
        kwargs["lowres_size"] = config.get("lowres_size")
        kwargs["lowres_cond"] = config["stage"] == "sr"
    else:
        kwargs["lowres_cond"] = config["stage"] == "sr"
    return kwargs


def preset_config(name: str, **overrides) -> Dict[str, Any]:
    """The full config dict of a preset with overrides applied (unknown keys raise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown U-Net preset {name!r}; known: {sorted(PRESETS)}")
    config = copy.deepcopy(PRESETS[name])
    config["name"] = name
    for key, value in overrides.items():
        if key in ("arch", "name"):
            raise ValueError(f"{key} cannot be overridden")
        config[key] = value
    # JSON-normal form (tuples -> lists), so a config compares equal to its saved copy
    return json.loads(json.dumps(config))


def unet_from_config(config: Dict[str, Any], device=None, dtype=None) -> torch.nn.Module:
    """Build a U-Net from a config dict (as stored in ``model.config``)."""
    arch = config.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"config 'arch' must be one of {sorted(ARCHS)}, got {arch!r}")
    kwargs = model_kwargs(config)
    try:
        if device is not None and torch.device(device).type == "meta":
            with torch.device("meta"):
                model = ARCHS[arch](**kwargs)
        else:
            model = ARCHS[arch](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad U-Net config for arch {arch!r}: {e}") from None
    model.config = copy.deepcopy(config)
    if device is not None and torch.device(device).type != "meta":
        model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(memory_format=torch.channels_last)


def build_unet(name: str, device=None, dtype=None, **overrides) -> torch.nn.Module:
    """Build a preset U-Net by name; keyword overrides replace preset fields
    (e.g. ``use_checkpoint=True``, ``text_dim=1024``)."""
    return unet_from_config(preset_config(name, **overrides), device=device, dtype=dtype)


def count_parameters(config: Dict[str, Any]) -> int:
    model = unet_from_config(config, device="meta")
    return sum(p.numel() for p in model.parameters())


def describe_presets() -> List[Dict[str, Any]]:
    """[{name, stage, resolution, lowres_resolution, arch, params}] for every preset."""
    out = []
    for name in PRESETS:
        config = preset_config(name)
        out.append(dict(name=name, stage=config["stage"], arch=config["arch"],
                        resolution=config["image_size"],
                        lowres_resolution=config.get("lowres_size"),
                        params=count_parameters(config)))
    return out
