"""Continuous-time Gaussian diffusion: forward process, training loss, posterior.

One ``GaussianDiffusion`` per cascade stage. It owns the noise schedule, the
prediction target ("eps" as in the paper, or "v"), classifier-free-guidance text
dropout and, for super-resolution stages, noise conditioning augmentation.

Choices where the paper is silent:
* t ~ U(0, 1) per sample; the schedules' log-SNR clipping keeps sigma_t > 0.
* Text dropout (p = 0.1) zeroes the sample's text embeddings AND masks every token, so
  the model sees exactly what the sampler's unconditional branch gives it.
* Noise augmentation noises the low-res image with a cosine schedule (the same for
  every stage, so an aug_level means the same corruption everywhere):
  lowres_aug = alpha(a) lowres + sigma(a) eps. Training draws a ~ U(0, aug_level_max)
  per sample (aug_level_max = 1 by default); sampling uses one fixed level (0 by default,
  the paper's best FID). The level is passed to the model as ``aug_level``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from ..core import diffusion_config
from .schedules import Schedule, get_schedule


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """(B,) float64 -> (B, 1, 1, 1) in like's dtype and device."""
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _draw(kind: str, shape, generator: Optional[torch.Generator], device, dtype) -> Tensor:
    """Random numbers drawn on the generator's device, then moved to ``device``."""
    gen_dev = generator.device if generator is not None else device
    fn = torch.rand if kind == "uniform" else torch.randn
    return fn(tuple(shape), generator=generator, device=gen_dev, dtype=dtype).to(device)


def drop_text(text_embeds: Optional[Tensor], text_mask: Optional[Tensor], drop: Tensor
              ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Zero the text and mask all tokens of the samples where ``drop`` (B,) is True."""
    if text_embeds is None:
        return None, None
    b, l = text_embeds.shape[:2]
    if text_mask is None:
        text_mask = torch.ones(b, l, dtype=torch.bool, device=text_embeds.device)
    keep = ~drop.to(text_embeds.device)
    return text_embeds * keep[:, None, None].to(text_embeds.dtype), text_mask.bool() & keep[:, None]


def null_text(text_embeds: Tensor) -> Tuple[Tensor, Tensor]:
    """The unconditional text: zeros, every token masked."""
    b, l = text_embeds.shape[:2]
    return (torch.zeros_like(text_embeds),
            torch.zeros(b, l, dtype=torch.bool, device=text_embeds.device))


class GaussianDiffusion:
    def __init__(self, schedule="cosine", prediction: str = "eps", cond_drop_prob: float = 0.1,
                 noise_aug: bool = False, aug_level_max: float = 1.0, aug_schedule=None):
        as_spec = lambda s: s.config() if isinstance(s, Schedule) else s  # noqa: E731
        cfg = diffusion_config(as_spec(schedule), prediction, cond_drop_prob, noise_aug,
                               aug_level_max, as_spec(aug_schedule))
        self.schedule: Schedule = get_schedule(cfg["schedule"])
        self.prediction = cfg["prediction"]
        self.cond_drop_prob = cfg["cond_drop_prob"]
        self.noise_aug = cfg["noise_aug"]
        self.aug_level_max = cfg["aug_level_max"]
        self.aug_schedule: Schedule = get_schedule(cfg["aug_schedule"])

    # ------------------------------------------------------------------ config
    def config(self) -> Dict:
        return dict(schedule=self.schedule.config(), prediction=self.prediction,
                    cond_drop_prob=self.cond_drop_prob, noise_aug=self.noise_aug,
                    aug_level_max=self.aug_level_max, aug_schedule=self.aug_schedule.config())

    @classmethod
    def from_config(cls, config: Dict) -> "GaussianDiffusion":
        return cls(**config)

    # ------------------------------------------------------- forward process
    def alpha_sigma(self, t) -> Tuple[Tensor, Tensor]:
        return self.schedule.alpha_sigma(t)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.prediction == "eps":
            return noise
        alpha, sigma = self.alpha_sigma(t)
        return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0

    def predict_x0(self, z_t: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        """x0 from the model output (no thresholding)."""
        alpha, sigma = self.alpha_sigma(t)
        a, s = _bcast(alpha, z_t), _bcast(sigma, z_t)
        if self.prediction == "eps":
            return (z_t - s * pred) / a
        return a * z_t - s * pred

    def predict_eps(self, z_t: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        if self.prediction == "eps":
            return pred
        alpha, sigma = self.alpha_sigma(t)
        return _bcast(sigma, z_t) * z_t + _bcast(alpha, z_t) * pred

    def q_posterior(self, x0: Tensor, z_t: Tensor, t, s) -> Tuple[Tensor, Tensor]:
        """Mean and variance of q(z_s | z_t, x0) for s < t (per-sample t, s allowed)."""
        n = z_t.shape[0]
        a_t, s_t = (v.expand(n) if v.ndim == 0 else v for v in self.alpha_sigma(t))
        a_s, s_s = (v.expand(n) if v.ndim == 0 else v for v in self.alpha_sigma(s))
        coefs = ops.step_coefficients(a_t, s_t, a_s, s_s, sampler="ddpm")
        mean = _bcast(coefs[:, 2], z_t) * x0 + _bcast(coefs[:, 3], z_t) * z_t
        return mean, _bcast(coefs[:, 4] ** 2, z_t)

    # ------------------------------------------------- conditioning helpers
    def augment_lowres(self, lowres: Tensor, aug_level: Tensor,
                       generator: Optional[torch.Generator] = None,
                       noise: Optional[Tensor] = None) -> Tensor:
        """Noise the low-res conditioning image to ``aug_level`` (B,) in [0, 1]."""
        if noise is None:
            noise = _draw("normal", lowres.shape, generator, lowres.device, lowres.dtype)
        level = aug_level.detach().double()
        alpha, sigma = self.aug_schedule.alpha_sigma(level)
        # level 0 means "no augmentation": exactly the clean image
        alpha = torch.where(level <= 0, torch.ones_like(alpha), alpha)
        sigma = torch.where(level <= 0, torch.zeros_like(sigma), sigma)
        return _bcast(alpha, lowres) * lowres + _bcast(sigma, lowres) * noise

    # -------------------------------------------------------------- training
    def loss(self, model, x0: Tensor, text_embeds: Optional[Tensor] = None,
             text_mask: Optional[Tensor] = None, lowres: Optional[Tensor] = None, *,
             t: Optional[Tensor] = None, noise: Optional[Tensor] = None,
             aug_level: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
             drop: Optional[Tensor] = None, aug_noise: Optional[Tensor] = None,
             reduction: str = "mean") -> Tensor:
        """Squared error between the model output and the target (eps or v).

        Draws t ~ U(0, 1), the noise, the text-dropout coins (``drop``, bool (B,),
        True = drop, with p = cond_drop_prob) and, when ``lowres`` is given, the
        augmentation level ~ U(0, aug_level_max) and its noise (``aug_noise``), from
        ``generator`` unless given explicitly. reduction "mean" or "none" (per sample).
        """
        b = x0.shape[0]
        dev = x0.device
        if t is None:
            t = _draw("uniform", (b,), generator, dev, torch.float64)
        if noise is None:
            noise = _draw("normal", x0.shape, generator, dev, x0.dtype)
        z_t = self.q_sample(x0, t, noise)
        if text_embeds is not None and (drop is not None or self.cond_drop_prob > 0):
            if drop is None:
                drop = _draw("uniform", (b,), generator, dev, torch.float64) < self.cond_drop_prob
            text_embeds, text_mask = drop_text(text_embeds, text_mask, drop.to(dev))
        kwargs = {}
        if lowres is not None:
            if aug_level is None:
                if self.noise_aug:
                    aug_level = _draw("uniform", (b,), generator, dev, torch.float64) * self.aug_level_max
                else:
                    aug_level = torch.zeros(b, dtype=torch.float64)
            aug_level = aug_level.to(dev)
            kwargs = dict(lowres=self.augment_lowres(lowres, aug_level, generator, aug_noise),
                          aug_level=aug_level.float())
        pred = model(z_t, t.float(), text_embeds, text_mask, **kwargs)
        err = (pred.float() - self.target(x0, noise, t).float()) ** 2
        per_sample = err.reshape(b, -1).mean(dim=1)
        if reduction == "none":
            return per_sample
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        return per_sample.mean()
