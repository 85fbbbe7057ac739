"""Flax NNX layers with torch's parameters, in JAX's layouts.

Every layer keeps the parameter names of its torch counterpart ("weight", "bias")
and says in ``TORCH_LAYOUT`` how each is stored relative to torch, so a torch
state dict maps onto a Flax model key for key (``imagen_fast.jax.convert``):

    "same"            identical array                  (norms, biases, pooling queries)
    "linear"          torch (out, in)        -> (in, out)
    "conv"            torch (O, I, kh, kw)   -> (kh, kw, I, O)   (HWIO, images NHWC)
    "conv_transpose"  torch (I, O, kh, kw)   -> (kh, kw, I, O)

Initialisation follows torch's defaults (uniform in +-1/sqrt(fan_in) for weights and
biases), drawn on the host from a numpy Generator, so a model trained from scratch
starts like the torch one. Layers compute
in the dtype of their input (weights are cast to it): bfloat16 activations with
float32 master weights is the mixed-precision mode.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...models.blocks import pick_groups
from .. import ops


def _uniform(rng: np.random.Generator, shape, fan_in: int):
    """Drawn on the host with numpy: fast, no compilation per parameter shape."""
    bound = 1.0 / math.sqrt(fan_in)
    return jnp.asarray(rng.uniform(-bound, bound, shape).astype(np.float32))


def _const(shape, value: float):
    return jnp.asarray(np.full(shape, value, np.float32))


class Linear(nnx.Module):
    TORCH_LAYOUT = {"weight": "linear", "bias": "same"}

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 rng: np.random.Generator):
        self.weight = nnx.Param(_uniform(rng, (in_features, out_features), in_features))
        self.bias = nnx.Param(_uniform(rng, (out_features,), in_features)) if bias else None

    def __call__(self, x):
        y = jnp.matmul(x, self.weight[...].astype(x.dtype))
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class Conv2d(nnx.Module):
    """torch.nn.Conv2d on NHWC images (symmetric zero padding, like torch)."""
    TORCH_LAYOUT = {"weight": "conv", "bias": "same"}

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, rng: np.random.Generator):
        fan_in = in_channels * kernel_size * kernel_size
        self.weight = nnx.Param(_uniform(rng, (kernel_size, kernel_size, in_channels,
                                                out_channels), fan_in))
        self.bias = nnx.Param(_uniform(rng, (out_channels,), fan_in))
        self.stride = stride
        self.padding = padding

    def __call__(self, x):
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x, self.weight[...].astype(x.dtype), (self.stride, self.stride), [(p, p), (p, p)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(x.dtype)


class ConvTranspose2d(nnx.Module):
    """torch.nn.ConvTranspose2d on NHWC images: a stride-1 convolution of the input
    dilated by ``stride`` with the spatially flipped kernel, padded by k - 1 - padding
    (plus output_padding at the end)."""
    TORCH_LAYOUT = {"weight": "conv_transpose", "bias": "same"}

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int,
                 padding: int, output_padding: int, rng: np.random.Generator):
        fan_in = out_channels * kernel_size * kernel_size        # torch's fan-in of (I, O, k, k)
        self.weight = nnx.Param(_uniform(rng, (kernel_size, kernel_size, in_channels,
                                                out_channels), fan_in))
        self.bias = nnx.Param(_uniform(rng, (out_channels,), fan_in))
        self.stride, self.padding, self.output_padding = stride, padding, output_padding

    def __call__(self, x):
        k = self.weight.shape[0]
        lo = k - 1 - self.padding
        pad = [(lo, lo + self.output_padding)] * 2
        w = jnp.flip(self.weight[...], axis=(0, 1)).astype(x.dtype)
        y = jax.lax.conv_general_dilated(x, w, (1, 1), pad, lhs_dilation=(self.stride, self.stride),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(x.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis (biased variance, float32 statistics)."""
    TORCH_LAYOUT = {"weight": "same", "bias": "same"}

    def __init__(self, dim: int, eps: float = 1e-5):
        self.weight = nnx.Param(_const((dim,), 1.0))
        self.bias = nnx.Param(_const((dim,), 0.0))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = ((xf - mean) ** 2).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]
        return y.astype(x.dtype)


class GroupNormAct(nnx.Module):
    """GroupNorm with affine weight/bias, optional FiLM and activation: one
    ``imagen_fast.jax.ops.group_norm_silu`` call (the Pallas kernel on TPU)."""
    TORCH_LAYOUT = {"weight": "same", "bias": "same"}

    def __init__(self, channels: int, groups: int = 32, activation: Optional[str] = "silu",
                 eps: float = 1e-5):
        self.num_groups = pick_groups(channels, groups)
        self.activation = activation
        self.eps = eps
        self.weight = nnx.Param(_const((channels,), 1.0))
        self.bias = nnx.Param(_const((channels,), 0.0))

    def __call__(self, x, scale=None, shift=None):
        return ops.group_norm_silu(x, self.num_groups, self.weight[...], self.bias[...], self.eps,
                                   scale, shift, self.activation)


class SiLU(nnx.Module):
    """No parameters: holds torch's nn.Sequential index of its SiLU."""

    def __call__(self, x):
        return jax.nn.silu(x)


def zero_init(layer: nnx.Module) -> nnx.Module:
    """Zero a layer's parameters (residual branches start as the identity)."""
    for name in layer.TORCH_LAYOUT:
        p = getattr(layer, name, None)
        if p is not None:
            p[...] = _const(p.shape, 0.0)
    return layer
