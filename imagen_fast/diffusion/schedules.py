"""Continuous-time variance-preserving noise schedules.

z_t = alpha_t x + sigma_t eps with alpha_t^2 + sigma_t^2 = 1 and t in [0, 1]. A schedule
is a decreasing log signal-to-noise ratio lambda(t) = log(alpha_t^2 / sigma_t^2), so
alpha_t^2 = sigmoid(lambda) and sigma_t^2 = sigmoid(-lambda). Everything is computed in
float64 (the coefficients are per-sample scalars, precision is free).

* "cosine": lambda(t) = -2 log tan(a t + b), the cosine schedule of Nichol & Dhariwal in
  log-SNR form, with a and b chosen so that lambda(0) = logsnr_max and
  lambda(1) = logsnr_min (defaults +20 / -20), so neither end is singular.
* "linear": DDPM's linear betas from 1e-4 to 0.02 over N = 1000 steps, made continuous:
  -log alpha_bar after n steps, sum_{i<=n} -log(1 - beta_i), is replaced by its midpoint
  integral over [0.5, n + 0.5] with beta linear in the step index, which has a closed
  form; at t = n / N it matches the discrete alpha_bar to ~1e-6 relative. The log-SNR
  is clipped to logsnr_max near t = 0.
"""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch
from torch import Tensor

TimeLike = Union[float, Tensor]


class Schedule:
    name = "base"

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        if not logsnr_min < logsnr_max:
            raise ValueError(f"need logsnr_min < logsnr_max, got {logsnr_min}, {logsnr_max}")
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)

    def _logsnr(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def logsnr(self, t: TimeLike) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return self._logsnr(t.to(torch.float64).clamp(0.0, 1.0)).clamp(self.logsnr_min,
                                                                       self.logsnr_max)

    def alpha_sigma(self, t: TimeLike) -> Tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) in float64, t's shape."""
        lam = self.logsnr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def config(self) -> dict:
        return dict(name=self.name, logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


class CosineSchedule(Schedule):
    name = "cosine"

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        super().__init__(logsnr_min, logsnr_max)
        self._b = math.atan(math.exp(-0.5 * self.logsnr_max))
        self._a = math.atan(math.exp(-0.5 * self.logsnr_min)) - self._b

    def _logsnr(self, t: Tensor) -> Tensor:
        return -2.0 * torch.log(torch.tan(self._a * t + self._b))


class LinearSchedule(Schedule):
    name = "linear"

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000,
                 logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        super().__init__(logsnr_min, logsnr_max)
        if not 0.0 < beta_start < beta_end < 1.0 or num_steps < 2:
            raise ValueError(f"need 0 < beta_start < beta_end < 1 and num_steps >= 2, got "
                             f"{beta_start}, {beta_end}, {num_steps}")
        self.beta_start, self.beta_end, self.num_steps = float(beta_start), float(beta_end), int(num_steps)
        self._k = (self.beta_end - self.beta_start) / (self.num_steps - 1)   # beta per step

    def _antiderivative(self, x: Tensor) -> Tensor:
        """F with F' = -log(1 - beta(x)), beta(x) = beta_start + k (x - 1)."""
        u = 1.0 - (self.beta_start + self._k * (x - 1.0))
        return (u * torch.log(u) - u) / self._k

    def _logsnr(self, t: Tensor) -> Tensor:
        # g = -log(alpha_bar); log(alpha^2 / sigma^2) = -log(exp(g) - 1)
        n = t * self.num_steps
        g = self._antiderivative(n + 0.5) - self._antiderivative(torch.full_like(n, 0.5))
        return -torch.log(torch.expm1(g.clamp(min=1e-30)))

    def config(self) -> dict:
        return dict(super().config(), beta_start=self.beta_start, beta_end=self.beta_end,
                    num_steps=self.num_steps)


SCHEDULES = {"cosine": CosineSchedule, "linear": LinearSchedule}


def get_schedule(spec) -> Schedule:
    """A Schedule from a name, a config dict (``Schedule.config()``) or a Schedule."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or spec.get("name") not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)} (or its config dict), got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    return SCHEDULES[spec["name"]](**kwargs)
