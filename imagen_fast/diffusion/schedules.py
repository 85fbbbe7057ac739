"""Continuous-time variance-preserving noise schedules for the torch path.

The maths (and the config checks) live once in ``imagen_fast.core.schedules``, shared
with the JAX path; these classes evaluate it on float64 torch tensors, on the device of
``t``. z_t = alpha_t x + sigma_t eps with alpha_t^2 + sigma_t^2 = 1 and t in [0, 1].
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor

from .. import core

TimeLike = Union[float, Tensor]


class Schedule:
    name = "base"

    def __init__(self, **settings):
        self._config = core.schedule_config(dict(name=self.name, **settings))
        for key, value in self._config.items():
            if key != "name":
                setattr(self, key, value)

    def logsnr(self, t: TimeLike) -> Tensor:
        """lambda(t) = log(alpha_t^2 / sigma_t^2) in float64, t clipped to [0, 1]."""
        return core.logsnr(self._config, torch.as_tensor(t, dtype=torch.float64), xp=torch)

    def alpha_sigma(self, t: TimeLike) -> Tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) in float64, t's shape."""
        return core.alpha_sigma(self._config, torch.as_tensor(t, dtype=torch.float64), xp=torch)

    def config(self) -> dict:
        return dict(self._config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


class CosineSchedule(Schedule):
    """lambda(t) = -2 log tan(a t + b), from logsnr_max at t = 0 to logsnr_min at t = 1."""
    name = "cosine"

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        super().__init__(logsnr_min=logsnr_min, logsnr_max=logsnr_max)


class LinearSchedule(Schedule):
    """DDPM's linear betas (beta_start to beta_end over num_steps), made continuous."""
    name = "linear"

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000,
                 logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        super().__init__(beta_start=beta_start, beta_end=beta_end, num_steps=num_steps,
                         logsnr_min=logsnr_min, logsnr_max=logsnr_max)


SCHEDULES = {"cosine": CosineSchedule, "linear": LinearSchedule}


def get_schedule(spec) -> Schedule:
    """A Schedule from a name, a config dict (``Schedule.config()``) or a Schedule."""
    if isinstance(spec, Schedule):
        return spec
    cfg = core.schedule_config(spec)
    return SCHEDULES[cfg["name"]](**{k: v for k, v in cfg.items() if k != "name"})
