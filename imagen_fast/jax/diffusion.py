"""Continuous-time diffusion in JAX: the training loss and the samplers of
``imagen_fast.diffusion``, from the same config dicts (``GaussianDiffusion.config()``, as
a checkpoint stores them).

* The schedules, the time grid, the step coefficients and the names come from
  ``imagen_fast.core``, shared with the torch path: numpy float64 on the host for the
  sampler's coefficient tables, jnp float32 on the device where training draws t.
* ``Diffusion.loss`` is ``GaussianDiffusion.loss`` with every draw explicit
  (``Draws``), so a train step is a pure function of (params, batch, key).
* ``sample`` compiles the whole sampler loop once (``lax.scan`` over the time grid,
  per-step coefficients precomputed in float64 on the host), guidance as one
  2B-batch forward per step, thresholding through ``imagen_fast.jax.ops`` (the
  sort-free Pallas kernel on TPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from .. import core
from . import ops

def alpha_sigma(schedule: Dict[str, Any], t, xp=jnp):
    """(alpha_t, sigma_t) of a schedule config (``imagen_fast.core.alpha_sigma``), jnp by
    default."""
    return core.alpha_sigma(schedule, t, xp)


def step_coefficients(alpha_t, sigma_t, alpha_s, sigma_s, *, sampler: str = "ddpm",
                      eta: float = 0.0, prediction: str = "eps") -> np.ndarray:
    """[a, b, c_x0, c_z, c_noise] of one step t -> s in float64 (``imagen_fast.core``)."""
    return np.array(core.step_coefficients(*(np.float64(v) for v in (alpha_t, sigma_t, alpha_s, sigma_s)),
                                           sampler=sampler, eta=eta, prediction=prediction))


def sampler_step(z, pred_cond, pred_uncond, guidance_scale, coefs, noise, threshold: str,
                 percentile: float, min_value: float = 1.0):
    """One step from coefficients (5,) (see ``imagen_fast.ops.reference.sampler_step``):
    guidance combine -> x0 -> threshold -> z_s."""
    pred = pred_cond if pred_uncond is None else pred_uncond + guidance_scale * (pred_cond - pred_uncond)
    a, b, c_x0, c_z, c_noise = (coefs[i].astype(z.dtype) for i in range(5))
    x0 = a * z + b * pred
    if threshold == "dynamic":
        x0 = ops.dynamic_threshold(x0, percentile, min_value)
    elif threshold == "static":
        x0 = jnp.clip(x0, -1.0, 1.0)
    z_s = c_x0 * x0 + c_z * z
    return z_s if noise is None else z_s + c_noise * noise


# ---------------------------------------------------------------- training loss
@jax.tree_util.register_dataclass
@dataclass
class Draws:
    """Every random number of one loss evaluation (torch's ``loss`` keyword arguments)."""
    t: Any                      # (B,) in [0, 1]
    noise: Any                  # x0's shape
    drop: Any                   # (B,) bool, True = drop the text
    aug_level: Any = None       # (B,) for SR stages
    aug_noise: Any = None       # lowres's shape


class Diffusion:
    """The JAX twin of ``GaussianDiffusion``, built from its ``config()`` dict."""

    def __init__(self, config: Dict[str, Any]):
        self.config = core.diffusion_config(**config)                  # validated, complete
        self.schedule = self.config["schedule"]
        self.aug_schedule = self.config["aug_schedule"]
        self.prediction = self.config["prediction"]
        self.cond_drop_prob = self.config["cond_drop_prob"]
        self.noise_aug = self.config["noise_aug"]
        self.aug_level_max = self.config["aug_level_max"]

    def draws(self, key, x_shape, lowres_shape=None, t_max: float = 1.0) -> Draws:
        """Fresh draws for a batch: t ~ U(0, t_max), noise, text-dropout coins with
        p = cond_drop_prob and, for SR, aug level ~ U(0, aug_level_max) and its noise."""
        b = x_shape[0]
        k_t, k_n, k_d, k_a, k_an = jax.random.split(key, 5)
        d = Draws(t=jax.random.uniform(k_t, (b,)) * t_max, noise=jax.random.normal(k_n, x_shape),
                  drop=jax.random.uniform(k_d, (b,)) < self.cond_drop_prob)
        if lowres_shape is not None:
            d.aug_level = (jax.random.uniform(k_a, (b,)) * self.aug_level_max if self.noise_aug
                           else jnp.zeros((b,)))
            d.aug_noise = jax.random.normal(k_an, lowres_shape)
        return d

    def augment_lowres(self, lowres, level, noise):
        alpha, sigma = alpha_sigma(self.aug_schedule, level)
        alpha = jnp.where(level <= 0, 1.0, alpha)          # level 0: the clean image
        sigma = jnp.where(level <= 0, 0.0, sigma)
        return _bcast(alpha, lowres) * lowres + _bcast(sigma, lowres) * noise

    def loss(self, model: Callable, x0, text_embeds, text_mask, lowres, draws: Draws,
             reduction: str = "mean"):
        """Squared error in eps (or v) space, per sample then averaged, float32."""
        b = x0.shape[0]
        alpha, sigma = alpha_sigma(self.schedule, draws.t)
        z_t = _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * draws.noise.astype(x0.dtype)
        if text_embeds is not None:
            keep = ~draws.drop
            if text_mask is None:
                text_mask = jnp.ones(text_embeds.shape[:2], bool)
            text_embeds = text_embeds * keep[:, None, None].astype(text_embeds.dtype)
            text_mask = text_mask.astype(bool) & keep[:, None]
        kwargs = {}
        if lowres is not None:
            kwargs = dict(lowres=self.augment_lowres(lowres, draws.aug_level, draws.aug_noise),
                          aug_level=draws.aug_level)
        pred = model(z_t, draws.t, text_embeds, text_mask, **kwargs)
        target = draws.noise if self.prediction == "eps" else (
            _bcast(alpha, x0) * draws.noise - _bcast(sigma, x0) * x0)
        err = (pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
        per_sample = err.reshape(b, -1).mean(axis=1)
        return per_sample if reduction == "none" else per_sample.mean()


def _bcast(v, like):
    return v.astype(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


# --------------------------------------------------------------------- sampling
def coefficient_table(diffusion: Diffusion, steps: int, sampler: str, eta: float,
                      start: float = 1.0) -> np.ndarray:
    """Per-step coefficients, float64 (``imagen_fast.core.coefficient_table``, shared with
    the torch sampler): ddpm/ddim (steps, 5), dpmpp2m (steps, 9)."""
    return core.coefficient_table(diffusion.schedule, steps, sampler, eta, diffusion.prediction,
                                  start)


def guided_inputs(text_embeds, text_mask, lowres, aug_level, guidance):
    """(guided, text, mask, lowres, aug_level): the 2B batch [cond | uncond] when
    guidance is on (text given and w != 1), the inputs as they are otherwise."""
    guided = text_embeds is not None and float(guidance) != 1.0
    if text_embeds is not None and text_mask is None:
        text_mask = jnp.ones(text_embeds.shape[:2], bool)
    if guided:
        text_embeds = jnp.concatenate([text_embeds, jnp.zeros_like(text_embeds)])
        text_mask = jnp.concatenate([text_mask.astype(bool), jnp.zeros(text_mask.shape, bool)])
        if lowres is not None:
            lowres = jnp.concatenate([lowres, lowres])
            aug_level = jnp.concatenate([aug_level, aug_level])
    return guided, text_embeds, text_mask, lowres, aug_level


def sample(model_fn: Callable, diffusion: Diffusion, shape, *, key=None, text_embeds=None,
           text_mask=None, lowres=None, aug_level: float = 0.0, guidance: float = 1.0,
           sampler: str = "ddpm", steps: int = 50, eta: float = 0.0, threshold: str = "dynamic",
           percentile: float = 0.995, noise=None, aug_noise=None, step_noise=None,
           start: float = 1.0):
    """Draw samples of ``shape`` (B, H, W, C) with ``model_fn(z, t, text, mask[, lowres=,
    aug_level=])``. Arguments as ``imagen_fast.diffusion.sample``; randomness from
    ``key`` unless given: ``noise`` the starting z_1, ``aug_noise`` the low-res
    augmentation noise, ``step_noise`` (steps, *shape) the per-step noise (the steps
    that need none ignore theirs). ``start`` < 1 (super-resolution only): the run starts
    at t = start from the (augmented) low-res image upsampled bicubically to ``shape``
    (``core.cubic_resize_matrix``), diffused with ``noise``. The loop is one ``lax.scan``: call this inside
    ``jax.jit`` (``compile_sampler`` does) to compile it once."""
    core.check_choice(sampler, "sampler", core.SAMPLERS)
    core.check_choice(threshold, "threshold", core.THRESHOLDS)
    table = jnp.asarray(coefficient_table(diffusion, steps, sampler, eta, start), jnp.float32)
    times = jnp.asarray(core.time_grid(steps, start)[:-1], jnp.float32)
    if start < 1.0 and lowres is None:
        raise ValueError(f"start: a start below 1 (got {start}) needs a super-resolution "
                         f"stage's lowres image to start from")
    if key is None:
        key = jax.random.key(0)
    k_z, k_aug, k_steps = jax.random.split(key, 3)
    b = shape[0]
    z = noise if noise is not None else jax.random.normal(k_z, shape)
    level = None
    if lowres is not None:
        level = jnp.full((b,), aug_level, jnp.float32)
        if aug_noise is None:
            aug_noise = jax.random.normal(k_aug, lowres.shape)
        lowres = diffusion.augment_lowres(lowres, level, aug_noise)
        if start < 1.0:
            mh, mw = (jnp.asarray(core.cubic_resize_matrix(n, m), jnp.float32)
                      for n, m in zip(lowres.shape[1:3], shape[1:3]))
            up = jnp.einsum("Hh,bhwc,Ww->bHWc", mh, lowres.astype(jnp.float32), mw)
            a0, s0 = core.alpha_sigma_at(diffusion.schedule, start)
            z = a0 * up.astype(z.dtype) + s0 * z
    guided, text, mask, lowres, level = guided_inputs(text_embeds, text_mask, lowres, level, guidance)
    kwargs = {} if lowres is None else dict(lowres=lowres, aug_level=level)
    w = float(guidance)

    def predict(z, t):
        n = b * (2 if guided else 1)
        zz = jnp.concatenate([z, z]) if guided else z
        out = model_fn(zz, jnp.full((n,), t), text, mask, **kwargs).astype(z.dtype)
        return (out[:b], out[b:]) if guided else (out, None)

    def step(carry, xs):
        z, x0_prev = carry
        i, t, c = xs
        cond, uncond = predict(z, t)
        if sampler == "dpmpp2m":
            x0 = sampler_step(z, cond, uncond, w, c[:5], None, threshold, percentile)
            d = c[7] * x0 - c[8] * x0_prev
            z_next = jnp.where(c[5] == 0.0, x0, c[5] * z - c[6] * d)
            return (z_next, x0), None
        eps = (step_noise[i] if step_noise is not None
               else jax.random.normal(jax.random.fold_in(k_steps, i), z.shape, z.dtype))
        return (sampler_step(z, cond, uncond, w, c, eps, threshold, percentile), x0_prev), None

    (z, _), _ = jax.lax.scan(step, (z, jnp.zeros_like(z)), (jnp.arange(steps), times, table))
    return z


def compile_sampler(model, diffusion: Diffusion, **settings):
    """A jitted ``fn(key, text_embeds, text_mask, lowres=None) -> images`` sampling
    ``model`` (an NNX U-Net) with fixed ``settings`` (shape, sampler, steps, ...)."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, key, text_embeds, text_mask, lowres=None):
        net = nnx.merge(graphdef, state)
        return sample(net, diffusion, key=key, text_embeds=text_embeds, text_mask=text_mask,
                      lowres=lowres, **settings)

    return lambda key, text_embeds=None, text_mask=None, lowres=None: run(
        state, key, text_embeds, text_mask, lowres)
