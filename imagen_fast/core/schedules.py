"""Continuous-time variance-preserving noise schedules, written once for every array
library: ``xp`` is numpy (float64 on the host: sampler coefficients), jax.numpy
(float32 on the device: training draws t there) or torch (the torch path's tensors); the
functions used exist in all three with the same meaning.

z_t = alpha_t x + sigma_t eps with alpha_t^2 + sigma_t^2 = 1 and t in [0, 1]. A schedule
is a decreasing log signal-to-noise ratio lambda(t) = log(alpha_t^2 / sigma_t^2), so
alpha_t^2 = sigmoid(lambda) and sigma_t^2 = sigmoid(-lambda).

* "cosine": lambda(t) = -2 log tan(a t + b), the cosine schedule of Nichol & Dhariwal in
  log-SNR form, with a and b chosen so that lambda(0) = logsnr_max and
  lambda(1) = logsnr_min (defaults +20 / -20), so neither end is singular. Past t = 1/2
  it is evaluated as 2 log tan(a (1 - t) + c), c = pi/2 - a - b, which keeps float32
  accurate where tan nears its pole.
* "linear": DDPM's linear betas from 1e-4 to 0.02 over N = 1000 steps, made continuous:
  -log alpha_bar after n steps, sum_{i<=n} -log(1 - beta_i), is replaced by its midpoint
  integral over [0.5, n + 0.5] with beta linear in the step index (at t = n / N it
  matches the discrete alpha_bar to ~1e-6 relative), evaluated without the cancellation
  of its closed form. The log-SNR is clipped to logsnr_max near t = 0.

A schedule is its config dict (``schedule_config``); so is a diffusion
(``diffusion_config``), as checkpoints store them.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np

from .checks import check_float
from .names import PREDICTIONS

SCHEDULES = ("cosine", "linear")
_DEFAULTS = {
    "cosine": dict(logsnr_min=-20.0, logsnr_max=20.0),
    "linear": dict(logsnr_min=-20.0, logsnr_max=20.0, beta_start=1e-4, beta_end=0.02, num_steps=1000),
}


def schedule_config(spec) -> Dict[str, Any]:
    """The complete, checked config of a schedule given by name or config dict."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or spec.get("name") not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)} (or its config dict), got {spec!r}")
    name = spec["name"]
    unknown = set(spec) - set(_DEFAULTS[name]) - {"name"}
    if unknown:
        raise ValueError(f"schedule {name!r}: unknown settings {sorted(unknown)}")
    cfg = dict(name=name, **{k: spec.get(k, v) for k, v in _DEFAULTS[name].items()})
    lo, hi = float(cfg["logsnr_min"]), float(cfg["logsnr_max"])
    if not lo < hi:
        raise ValueError(f"need logsnr_min < logsnr_max, got {lo}, {hi}")
    cfg.update(logsnr_min=lo, logsnr_max=hi)
    if name == "linear":
        b0, b1, n = float(cfg["beta_start"]), float(cfg["beta_end"]), cfg["num_steps"]
        if not 0.0 < b0 < b1 < 1.0 or isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"need 0 < beta_start < beta_end < 1 and num_steps >= 2, got "
                             f"{b0}, {b1}, {n}")
        cfg.update(beta_start=b0, beta_end=b1)
    return cfg


def diffusion_config(schedule="cosine", prediction: str = "eps", cond_drop_prob: float = 0.1,
                     noise_aug: bool = False, aug_level_max: float = 1.0,
                     aug_schedule=None) -> Dict[str, Any]:
    """The complete, checked config of one cascade stage's diffusion (the keyword
    arguments of imagen_fast.diffusion.GaussianDiffusion, schedules as names or dicts)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    cond_drop_prob = check_float(cond_drop_prob, "cond_drop_prob")
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
    aug_level_max = check_float(aug_level_max, "aug_level_max")
    if not 0.0 <= aug_level_max <= 1.0:
        raise ValueError(f"aug_level_max must be in [0, 1], got {aug_level_max}")
    return dict(schedule=schedule_config(schedule), prediction=prediction,
                cond_drop_prob=cond_drop_prob, noise_aug=bool(noise_aug),
                aug_level_max=aug_level_max, aug_schedule=schedule_config(aug_schedule or "cosine"))


def _linear_excess(delta, xp):
    """(1 + d) log1p(d) - d, accurate for small |d| (series) and elsewhere."""
    series = delta * delta * (0.5 + delta * (-1 / 6 + delta * (1 / 12 + delta * (
        -1 / 20 + delta * (1 / 30 - delta / 42)))))
    direct = (1 + delta) * xp.log1p(delta) - delta
    return xp.where(xp.abs(delta) < 0.05, series, direct)


def logsnr(schedule: Dict[str, Any], t, xp=np):
    """lambda(t) = log(alpha^2 / sigma^2) of a schedule config, t clipped to [0, 1]."""
    cfg = schedule_config(schedule)
    lo, hi = cfg["logsnr_min"], cfg["logsnr_max"]
    t = xp.clip(t, 0.0, 1.0)
    if cfg["name"] == "cosine":
        b = math.atan(math.exp(-0.5 * hi))
        a = math.atan(math.exp(-0.5 * lo)) - b
        c = math.atan(math.exp(0.5 * lo))
        lam = xp.where(t < 0.5, -2.0 * xp.log(xp.tan(a * t + b)),
                       2.0 * xp.log(xp.tan(a * (1.0 - t) + c)))
    else:
        b0, b1, steps = cfg["beta_start"], cfg["beta_end"], cfg["num_steps"]
        k = (b1 - b0) / (steps - 1)
        # g = integral over [0.5, n + 0.5] of -log(1 - beta(x)), beta(x) = b0 + k (x - 1):
        # with u = 1 - beta, g = -dx log u_a + (u_a / k) * excess(du / u_a), no cancellation
        dx = t * steps
        u_a = 1.0 - (b0 + k * (0.5 - 1.0))
        g = -dx * math.log(u_a) + (u_a / k) * _linear_excess(-k * dx / u_a, xp)
        lam = -xp.log(xp.expm1(xp.clip(g, 1e-30, None)))   # log(alpha^2/sigma^2) = -log(e^g - 1)
    return xp.clip(lam, lo, hi)


def alpha_sigma(schedule: Dict[str, Any], t, xp=np):
    """(alpha_t, sigma_t) of a schedule config, t's shape."""
    lam = logsnr(schedule, t, xp)
    return xp.sqrt(1.0 / (1.0 + xp.exp(-lam))), xp.sqrt(1.0 / (1.0 + xp.exp(lam)))
