"""Continuous-time VP diffusion: schedules, loss, guidance, thresholding, samplers."""
from .gaussian import PREDICTIONS, GaussianDiffusion, drop_text, null_text
from .samplers import (
    SAMPLERS,
    THRESHOLDS,
    GuidedDenoiser,
    ddim_invert,
    sample,
    time_grid,
)
from .schedules import SCHEDULES, CosineSchedule, LinearSchedule, Schedule, get_schedule

__all__ = [
    "CosineSchedule", "GaussianDiffusion", "GuidedDenoiser", "LinearSchedule", "PREDICTIONS",
    "SAMPLERS", "SCHEDULES", "Schedule", "THRESHOLDS", "ddim_invert", "drop_text",
    "get_schedule", "null_text", "sample", "time_grid",
]
