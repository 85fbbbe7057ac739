"""Weights between the torch models and the Flax ones, both ways, and the cascade
checkpoint (``imagen_fast.cascade``: config.json + model.safetensors) read and
written from JAX.

The Flax modules carry torch's parameter names, so a torch state-dict key is the
Flax module path joined by dots; only the storage layout differs (each layer's
``TORCH_LAYOUT``). Conversions are exact (transposes, no arithmetic). Mismatched
architectures raise ValueError naming the first differing keys.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Tuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..checkpoint import describe_mismatch
from .models import unet_from_config

# torch layout -> Flax layout, and back
_TO_FLAX = {"same": None, "linear": (1, 0), "conv": (2, 3, 1, 0), "conv_transpose": (2, 3, 0, 1)}
_TO_TORCH = {"same": None, "linear": (1, 0), "conv": (3, 2, 0, 1), "conv_transpose": (2, 3, 0, 1)}


def parameter_map(model) -> Dict[str, Tuple[nnx.Param, str]]:
    """torch state-dict key -> (the Flax parameter, its layout kind), every parameter."""
    out: Dict[str, Tuple[nnx.Param, str]] = {}
    for path, module in nnx.iter_modules(model):
        for name, kind in getattr(type(module), "TORCH_LAYOUT", {}).items():
            param = getattr(module, name, None)
            if param is not None:
                out[".".join(str(p) for p in (*path, name))] = (param, kind)
    n_params = len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    if len(out) != n_params:
        raise RuntimeError(f"{type(model).__name__}: {n_params - len(out)} parameter(s) have no "
                           f"torch layout")
    return out


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):                     # a torch tensor
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _permute(array: np.ndarray, axes) -> np.ndarray:
    return array if axes is None else np.ascontiguousarray(array.transpose(axes))


def to_flax_layout(array, kind: str) -> np.ndarray:
    return _permute(_numpy(array), _TO_FLAX[kind])


def to_torch_layout(array, kind: str) -> np.ndarray:
    return _permute(np.asarray(array, dtype=np.float32), _TO_TORCH[kind])


def load_state_dict(model, state_dict: Mapping[str, Any], what: str = "state dict") -> None:
    """Copy a torch-layout state dict (torch tensors or arrays) into ``model`` in place."""
    params = parameter_map(model)
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    shapes = []
    converted = {}
    for key in sorted(set(params) & set(state_dict)):
        param, kind = params[key]
        value = to_flax_layout(state_dict[key], kind)
        if value.shape != tuple(param.shape):
            axes = _TO_TORCH[kind] or range(len(param.shape))
            expected = tuple(param.shape[a] for a in axes)
            shapes.append(f"{key}: {tuple(_numpy(state_dict[key]).shape)} vs model {expected}")
        converted[key] = value
    problem = describe_mismatch(what, missing, unexpected, shapes)
    if problem:
        raise ValueError(problem)
    for key, value in converted.items():
        param = params[key][0]
        param[...] = jnp.asarray(value, dtype=param[...].dtype)


def state_dict(model) -> Dict[str, np.ndarray]:
    """The model's parameters as a torch-layout state dict of float32 numpy arrays."""
    return {key: to_torch_layout(np.asarray(param[...]), kind)
            for key, (param, kind) in parameter_map(model).items()}


def from_torch(torch_model, **kwargs):
    """A Flax U-Net equal to ``torch_model`` (built from its ``config``, weights copied)."""
    model = unet_from_config(torch_model.config, **kwargs)
    load_state_dict(model, torch_model.state_dict(), what=f"{type(torch_model).__name__} weights")
    return model


def to_torch(model, device=None):
    """A torch U-Net equal to the Flax ``model``."""
    import torch

    from ..models import unet_from_config as torch_unet

    net = torch_unet(model.config, device=device)
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict(model).items()}
    net.load_state_dict(tensors)
    return net


def pad_text(emb, mask, length: int):
    """Text embeddings from a torch encoder, (B, L, D) and (B, L), as numpy (B, length, D)
    float32 and (B, length) bool: padded or cut to a fixed length, so one compiled
    program serves every batch of prompts."""
    b, l, d = emb.shape
    out_e = np.zeros((b, length, d), np.float32)
    out_m = np.zeros((b, length), bool)
    n = min(l, length)
    out_e[:, :n] = emb[:, :n].float().cpu().numpy()
    out_m[:, :n] = mask[:, :n].bool().cpu().numpy()
    return out_e, out_m


# --------------------------------------------------------------- cascade checkpoints
def load_cascade(path: str, **kwargs) -> List[Dict[str, Any]]:
    """The stages of a cascade checkpoint directory as Flax models: a list of
    {"name", "model", "diffusion" (config dict), "sampling" (SamplingConfig's complete
    dict, old spellings read)}, in cascade order."""
    from safetensors.numpy import load_file

    from ..core import SamplingConfig
    from ..cascade import WEIGHTS_NAME, ImagenCascade

    config = ImagenCascade.read_config(path)
    weights = load_file(os.path.join(path, WEIGHTS_NAME))
    stages = []
    for i, sc in enumerate(config["stages"]):
        model = unet_from_config(sc["unet"], **kwargs)
        prefix = f"stages.{i}."
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        load_state_dict(model, own, what=f"{path} stage {i} ({sc['name']!r})")
        stages.append(dict(name=sc["name"], model=model, diffusion=sc["diffusion"],
                           sampling=SamplingConfig.from_dict(sc["sampling"]).to_dict()))
    return stages


def save_cascade(path: str, stages: List[Dict[str, Any]], text: Dict[str, Any] = None) -> None:
    """Write stages (as ``load_cascade`` returns them) in the cascade checkpoint format,
    with the text-encoder entry ``text`` when given; ``ImagenCascade.load(path)`` reads
    it back into torch."""
    from safetensors.numpy import save_file

    from ..cascade import FORMAT, FORMAT_VERSION, write_checkpoint

    config = dict(format=FORMAT, version=FORMAT_VERSION, stages=[
        dict(name=st["name"], unet=st["model"].config, diffusion=st["diffusion"],
             sampling=st["sampling"]) for st in stages])
    if text is not None:
        config["text"] = text
    tensors = {f"stages.{i}.{k}": v for i, st in enumerate(stages)
               for k, v in state_dict(st["model"]).items()}
    write_checkpoint(path, config, lambda file, meta: save_file(tensors, file, metadata=meta))
