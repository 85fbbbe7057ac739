"""Samplers with classifier-free guidance and thresholding.

* "ddpm": ancestral sampling (the posterior q(z_s | z_t, x0_hat) with its noise).
* "ddim": DDIM with any number of steps and ``eta`` (0 = deterministic).
* "dpmpp2m": DPM-Solver++(2M), the multistep second-order data-prediction solver for
  few-step sampling; its x0 predictions are thresholded like the others, the last step
  (to t = 0) is first order.

Every step calls the model ONCE: with guidance, the conditional and unconditional
inputs are stacked into one batch of size 2B (unconditional = zeroed text with every
token masked, exactly what training's text dropout produces). Guidance combine ->
x0 -> thresholding -> posterior runs in one fused ``ops.sampler_step`` call
(DPM-Solver++ asks the same op for the thresholded x0 alone, a step to t = 0).

The time grid is uniform in t, from ``start`` (1 by default) to 0 in ``steps`` steps; the
final point t = 0 is treated as clean data (alpha = 1, sigma = 0), so the result is the
last (thresholded) x0 prediction. A super-resolution stage may start below 1: from its
low-res input upsampled bicubically (``core.cubic_resize_matrix``) and diffused to
``start``: z = alpha_start up(lowres) + sigma_start noise. Every step's coefficients
are computed and checked on the host before the run (``core.coefficient_table``); a step
is ``step.guided_step``, a function of device tensors only, which ``compile=`` turns into
one compiled graph for the whole run.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..core import SAMPLERS, THRESHOLDS, alpha_sigma_at, check_choice, check_float, check_percentile
from ..core import coefficient_table, cubic_resize_matrix, time_grid
from .gaussian import GaussianDiffusion, _draw, null_text
from .step import CompileSpec, StepSpec, step_function


class GuidedDenoiser:
    """Model predictions for the conditional and unconditional branch in one forward.

    The batch-doubled inputs (text | null text, low-res image twice) are built once;
    each call stacks [z, z] and returns (pred_cond, pred_uncond), pred_uncond None when
    guidance is off (guidance == 1 or no text).
    """

    def __init__(self, model: Callable, batch: int, text_embeds: Optional[Tensor],
                 text_mask: Optional[Tensor], guidance: float,
                 lowres: Optional[Tensor] = None, aug_level: Optional[Tensor] = None):
        self.model = model
        self.batch = batch
        self.guided = text_embeds is not None and float(guidance) != 1.0
        self.calls = 0
        if text_embeds is not None and text_mask is None:
            text_mask = torch.ones(text_embeds.shape[:2], dtype=torch.bool, device=text_embeds.device)
        if self.guided:
            null_e, null_m = null_text(text_embeds)
            text_embeds = torch.cat([text_embeds, null_e])
            text_mask = torch.cat([text_mask.bool(), null_m])
            if lowres is not None:
                lowres = torch.cat([lowres, lowres])
                aug_level = torch.cat([aug_level, aug_level])
        self.text_embeds, self.text_mask = text_embeds, text_mask
        self.lowres, self.aug_level = lowres, aug_level
        self.kwargs = {} if lowres is None else dict(lowres=lowres, aug_level=aug_level)

    def __call__(self, z: Tensor, t: float) -> Tuple[Tensor, Optional[Tensor]]:
        self.calls += 1
        n = z.shape[0] * (2 if self.guided else 1)
        tt = torch.full((n,), float(t), device=z.device, dtype=torch.float32)
        zz = torch.cat([z, z]) if self.guided else z
        out = self.model(zz, tt, self.text_embeds, self.text_mask, **self.kwargs).to(z.dtype)
        if not self.guided:
            return out, None
        cond, uncond = out.chunk(2)
        return cond, uncond


def _alpha_sigma(diffusion: GaussianDiffusion, t: float) -> Tuple[float, float]:
    return alpha_sigma_at(diffusion.schedule.config(), t)


def _cubic_upsample(lowres: Tensor, size) -> Tensor:
    """(B, C, h, w) -> (B, C, H, W), bicubic as torch's interpolate (float32 maths)."""
    mh, mw = (torch.as_tensor(cubic_resize_matrix(n, m), dtype=torch.float32, device=lowres.device)
              for n, m in zip(lowres.shape[-2:], size))
    return mh @ lowres.float() @ mw.T


def _prepare_lowres(diffusion, lowres, aug_level, batch, generator, device):
    if lowres is None:
        return None, None
    level = torch.full((batch,), float(aug_level), dtype=torch.float64, device=device)
    noisy = diffusion.augment_lowres(lowres.to(device), level, generator)
    return noisy, level.float()


@torch.no_grad()
def sample(model: Callable, diffusion: GaussianDiffusion, shape, *,
           text_embeds: Optional[Tensor] = None, text_mask: Optional[Tensor] = None,
           lowres: Optional[Tensor] = None, aug_level: float = 0.0,
           guidance: float = 1.0, sampler: str = "ddpm", steps: int = 50,
           eta: float = 0.0, threshold: str = "dynamic", percentile: float = 0.995,
           generator: Optional[torch.Generator] = None, noise: Optional[Tensor] = None,
           device=None, dtype: torch.dtype = torch.float32,
           denoiser: Optional[GuidedDenoiser] = None,
           on_step: Optional[Callable[[int, int], None]] = None,
           compile: CompileSpec = "none", start: float = 1.0) -> Tensor:
    """Draw samples of ``shape`` (B, C, H, W) from ``model`` (called as
    ``model(z, t, text_embeds, text_mask[, lowres=, aug_level=])``).

    guidance w: pred = w * pred(text) + (1 - w) * pred(no text).
    threshold: "dynamic" (percentile p of |x0|, the paper's p = 0.995), "static"
    (clip to [-1, 1]) or "none". For super-resolution, ``lowres`` is noise-augmented to
    the fixed ``aug_level`` before sampling and the level is given to the model.
    ``noise`` is the starting z_1 (default: standard normal from ``generator``).
    ``start`` < 1 (super-resolution only): the run starts at t = start from the
    (augmented) low-res image upsampled bicubically to ``shape`` and diffused with ``noise``.
    ``on_step(done, total)`` is called after every denoising step (progress bars).
    ``compile``: "none" (eager), "default", "reduce-overhead" (CUDA graphs on a GPU),
    "max-autotune", or a dict of torch.compile's mode/backend/options: the whole guided
    step becomes one graph (``step.guided_step``), compiled on the first step and
    reused for every later step of this and later runs of the same model and settings.
    The same seed gives the same images either way (up to the compiler's rounding).
    """
    check_choice(sampler, "sampler", SAMPLERS)
    check_choice(threshold, "threshold", THRESHOLDS)
    table = coefficient_table(diffusion.schedule.config(), steps, sampler,
                              eta if sampler == "ddim" else 0.0, diffusion.prediction, start)
    if start < 1.0 and lowres is None and (denoiser is None or denoiser.lowres is None):
        raise ValueError(f"start: a start below 1 (got {start}) needs a super-resolution "
                         f"stage's lowres image to start from")
    spec = StepSpec(guided=False, guidance=check_float(guidance, "guidance"), threshold=threshold,
                    percentile=check_percentile(percentile), multistep=sampler == "dpmpp2m")
    if device is None:
        device = noise.device if noise is not None else (
            text_embeds.device if text_embeds is not None else torch.device("cpu"))
    b = shape[0]
    z = (noise.to(device=device, dtype=dtype) if noise is not None
         else _draw("normal", shape, generator, device, dtype))
    if denoiser is None:
        lowres_aug, level = _prepare_lowres(diffusion, lowres, aug_level, b, generator, device)
        denoiser = GuidedDenoiser(model, b, text_embeds, text_mask, guidance, lowres_aug, level)
    spec = dataclasses.replace(spec, guided=denoiser.guided)
    if start < 1.0:
        a0, s0 = _alpha_sigma(diffusion, start)
        z = a0 * _cubic_upsample(denoiser.lowres[:b], shape[-2:]).to(z.dtype) + s0 * z
    # the whole run's inputs on the device before the first step: one row per step
    rows = [r.clone() for r in torch.as_tensor(table, device=z.device).unbind(0)]
    times = [t.clone() for t in torch.tensor(time_grid(steps, start)[:-1], dtype=torch.float32,
                                             device=z.device).unbind(0)]
    noisy = [bool(c) for c in table[:, 4] != 0] if not spec.multistep else [False] * steps
    zeros = torch.zeros_like(z) if any(noisy) or spec.multistep else None
    x0_prev = zeros if spec.multistep else None
    cond = (denoiser.text_embeds, denoiser.text_mask, denoiser.lowres, denoiser.aug_level)
    step = step_function(denoiser.model, spec, compile,
                         (z, times[0], rows[0], zeros if any(noisy) else None, x0_prev) + cond)
    for i in range(steps):
        step_noise = None
        if any(noisy):
            step_noise = (torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                          if noisy[i] else zeros)
        z, x0 = step(spec, denoiser.model, z, times[i], rows[i], step_noise, x0_prev, *cond)
        x0_prev = x0
        if on_step is not None:
            on_step(i + 1, steps)
    return z


@torch.no_grad()
def ddim_invert(model: Callable, diffusion: GaussianDiffusion, x0: Tensor, *, steps: int = 50,
                text_embeds: Optional[Tensor] = None, text_mask: Optional[Tensor] = None,
                lowres: Optional[Tensor] = None, aug_level: float = 0.0,
                guidance: float = 1.0) -> Tensor:
    """Deterministic DDIM encoding x0 -> z_1 (the reverse of ``sample(..., sampler="ddim",
    eta=0, threshold="none")`` on the same grid, up to discretisation error).

    Step t -> s (s > t) uses the model at (z_t, t): z_s = alpha_s x0_hat + sigma_s eps_hat.
    No thresholding (it is not invertible). With ``lowres`` the augmentation level must
    be 0 or the encoding is random.
    """
    b = x0.shape[0]
    if lowres is not None and aug_level != 0.0:
        raise ValueError("ddim_invert needs aug_level=0 to be deterministic")
    lowres_aug, level = _prepare_lowres(diffusion, lowres, aug_level, b, None, x0.device)
    denoiser = GuidedDenoiser(model, b, text_embeds, text_mask, guidance, lowres_aug, level)
    grid = time_grid(steps)[::-1]
    z = x0
    w = float(guidance)
    for t, s in zip(grid[:-1], grid[1:]):
        a_t, s_t = _alpha_sigma(diffusion, t)
        a_s, s_s = _alpha_sigma(diffusion, s)
        cond, uncond = denoiser(z, t)
        pred = cond if uncond is None else uncond + w * (cond - uncond)
        if diffusion.prediction == "eps":
            eps = pred
            x0_hat = (z - s_t * eps) / a_t
        else:
            x0_hat = a_t * z - s_t * pred
            eps = s_t * z + a_t * pred
        z = a_s * x0_hat + s_s * eps
    return z
