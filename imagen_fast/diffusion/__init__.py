"""Continuous-time VP diffusion: schedules, loss, guidance, thresholding, samplers.

The framework-neutral rules (names, time grid, step coefficients, schedule maths) come
from ``imagen_fast.core``, shared with the JAX path."""
from ..core import PREDICTIONS, SAMPLERS, THRESHOLDS, time_grid
from .gaussian import GaussianDiffusion, drop_text, null_text
from .samplers import GuidedDenoiser, ddim_invert, sample
from .schedules import SCHEDULES, CosineSchedule, LinearSchedule, Schedule, get_schedule

__all__ = [
    "CosineSchedule", "GaussianDiffusion", "GuidedDenoiser", "LinearSchedule", "PREDICTIONS",
    "SAMPLERS", "SCHEDULES", "Schedule", "THRESHOLDS", "ddim_invert", "drop_text",
    "get_schedule", "null_text", "sample", "time_grid",
]
