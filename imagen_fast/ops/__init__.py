"""imagen_fast.ops: the one door to the kernels.

Models call these functions; each validates its arguments, picks a backend
(triton / cuda / cpu / torch) for the tensors' device and dtype, and is registered
with torch.library so torch.compile and torch.export see through it.
"""
from . import reference
from .api import (attention, channel_rms_norm_silu, dynamic_threshold, group_norm_silu,
                  is_channels_last, sampler_step, step_coefficients)
from .dispatch import BACKENDS, available_backends, requested_backend, use_backend

__all__ = [
    "BACKENDS", "attention", "available_backends", "channel_rms_norm_silu",
    "dynamic_threshold", "group_norm_silu", "is_channels_last", "reference",
    "requested_backend", "sampler_step", "step_coefficients", "use_backend",
]
