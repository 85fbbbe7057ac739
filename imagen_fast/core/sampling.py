"""Sampling rules shared by the torch and JAX samplers: the time grid, the coefficients of
one step, and SamplingConfig, the one validator of sampling settings (the CLI,
load_pipeline, the eval systems, the cascades of both paths and their checkpoints).

Guidance is spelled ``guidance`` everywhere a user sets it (the CLI's --guidance,
``pipe(..., guidance=)``, checkpoint configs). Configs written before that spelling say
``guidance_scale``; ``SamplingConfig.from_dict`` still reads them. Below the settings,
the fused op ``imagen_fast.ops.sampler_step`` keeps the argument name of diffusers'
pipelines, ``guidance_scale``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from .checks import check_choice, check_float
from .names import PREDICTIONS, SAMPLER_ALIASES, SAMPLERS, STEP_SAMPLERS, THRESHOLDS
from .schedules import alpha_sigma

# Old spelling -> current, accepted when reading stored configs.
_LEGACY_NAMES = {"guidance_scale": "guidance"}


def time_grid(steps: int, start: float = 1.0) -> List[float]:
    """Uniform in t from ``start`` (1: pure noise) to 0 in ``steps`` steps; t = 0 is clean
    data. A start below 1 is a truncated run (a super-resolution stage started from its
    upsampled input diffused to that time)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0.0 < start <= 1.0:
        raise ValueError(f"start must be a time in (0, 1], got {start!r}")
    return [start * (1.0 - i / steps) for i in range(steps)] + [0.0]


def alpha_sigma_at(schedule: Mapping[str, Any], t: float) -> Tuple[float, float]:
    """(alpha_t, sigma_t) in float64 at a grid point; t <= 0 is clean data (1, 0)."""
    if t <= 0.0:
        return 1.0, 0.0
    a, s = alpha_sigma(schedule, np.float64(t))
    return float(a), float(s)


def cubic_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64: one axis of bicubic resampling as torch's
    ``interpolate(mode="bicubic", align_corners=False)`` does it (Keys' cubic with
    a = -0.75, half-pixel centres, taps past an edge read the edge; no antialiasing).
    A truncated start's image is ``M_h @ lowres @ M_w.T`` on the torch and JAX paths alike."""
    for name, n in (("n_in", n_in), ("n_out", n_out)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    a = -0.75

    def kernel(x):
        x = np.abs(x)
        return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                        np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))

    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    for k in (-1, 0, 1, 2):
        idx = base + k
        np.add.at(m, (rows, np.clip(idx, 0, n_in - 1).astype(np.int64)), kernel(src - idx))
    return m


class _Floats:
    """The array namespace of step_coefficients for plain Python floats (a step whose
    times are numbers: ops.sampler_step's common case, where a few tensor operations on
    (N,) arrays would cost more than the fused step itself)."""

    sqrt = staticmethod(math.sqrt)

    @staticmethod
    def any(condition) -> bool:
        return bool(condition)

    @staticmethod
    def clip(value, low, high):
        """np.clip of one number (a NaN stays NaN)."""
        if low is not None and value < low:
            return low
        if high is not None and value > high:
            return high
        return value


FLOATS = _Floats()


def step_coefficients(alpha_t, sigma_t, alpha_s, sigma_s, *, sampler: str = "ddpm",
                      eta: float = 0.0, prediction: str = "eps", xp=np):
    """(a, b, c_x0, c_z, c_noise) of one step t -> s, each of the inputs' shape (numpy
    float64 scalars or arrays by default; ``xp=torch`` for float64 tensors, ``xp=FLOATS``
    for Python floats).

    Variance-preserving diffusion z_t = alpha_t x + sigma_t eps (alpha^2 + sigma^2 = 1).
      x0 = a z_t + b pred: eps-prediction a = 1/alpha_t, b = -sigma_t/alpha_t;
                           v-prediction   a = alpha_t,   b = -sigma_t.
      Posterior q(z_s | z_t, x0): alpha_ts = alpha_t/alpha_s,
        sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2,
        var = sigma_ts^2 sigma_s^2 / sigma_t^2.
      ddpm (ancestral): z_s = alpha_s sigma_ts^2/sigma_t^2 x0 + alpha_ts sigma_s^2/sigma_t^2 z_t
                              + sqrt(var) noise.
      ddim(eta): c = eta sqrt(var), eps' = (z_t - alpha_t x0)/sigma_t,
                 z_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps' + c noise
      (ddim with eta = 1 equals ddpm). The eps' of DDIM is re-derived from the
      thresholded x0, so thresholding keeps z_s consistent.
    A step then computes x0 = a z_t + b pred (thresholded) and
    z_s = c_x0 x0 + c_z z_t + c_noise noise.
    """
    check_choice(sampler, "sampler", STEP_SAMPLERS)
    check_choice(prediction, "prediction", PREDICTIONS)
    if bool(xp.any(alpha_t <= 0)) or bool(xp.any(sigma_t <= 0)):
        raise ValueError("alpha_t and sigma_t must be > 0")
    if bool(xp.any(alpha_s <= 0)) or bool(xp.any(sigma_s < 0)):
        raise ValueError("alpha_s must be > 0 and sigma_s >= 0")
    if prediction == "eps":
        a, b = 1.0 / alpha_t, -sigma_t / alpha_t
    else:
        a, b = alpha_t, -sigma_t
    alpha_ts = alpha_t / alpha_s
    sigma_ts2 = xp.clip(sigma_t ** 2 - alpha_ts ** 2 * sigma_s ** 2, 0.0, None)
    var = sigma_ts2 * sigma_s ** 2 / sigma_t ** 2
    c = (1.0 if sampler == "ddpm" else eta) * xp.sqrt(var)
    direction = xp.sqrt(xp.clip(sigma_s ** 2 - c ** 2, 0.0, None))        # multiplies eps'
    return a, b, alpha_s - direction * alpha_t / sigma_t, direction / sigma_t, c


def coefficient_table(schedule: Mapping[str, Any], steps: int, sampler: str = "ddpm",
                      eta: float = 0.0, prediction: str = "eps", start: float = 1.0) -> np.ndarray:
    """Every step's coefficients of a sampling run on ``time_grid(steps, start)``, float64, made
    and checked on the host once, before the run (the torch and JAX loops read rows of it
    on the device, so a step needs no host maths and no host checks).

    ddpm / ddim: (steps, 5) rows [a, b, c_x0, c_z, c_noise] (``step_coefficients``); a row
    with c_noise != 0 is a step that takes fresh noise.
    dpmpp2m (DPM-Solver++(2M), multistep in lambda = log(alpha / sigma)): (steps, 9) rows,
    the 5 of the DDIM step to t = 0 (it gives the guided, thresholded x0), then
    [c_z, c_d, d_x0, d_prev] of z_s = c_z z - c_d d, d = d_x0 x0 - d_prev x0_prev
    (first step d = x0); the last row (to t = 0) has c_z = c_d = 0: that step returns x0
    (first order).
    """
    check_choice(sampler, "sampler", SAMPLERS)
    check_choice(prediction, "prediction", PREDICTIONS)
    eta = check_float(eta, "eta", low=0.0, high=1.0)
    grid = time_grid(steps, start)
    rows = []
    h_prev = None
    for t, s in zip(grid[:-1], grid[1:]):
        a_t, s_t = alpha_sigma_at(schedule, t)
        a_s, s_s = alpha_sigma_at(schedule, s)
        if sampler != "dpmpp2m":
            rows.append(step_coefficients(*(np.float64(v) for v in (a_t, s_t, a_s, s_s)),
                                          sampler=sampler, eta=eta, prediction=prediction))
            continue
        x0_step = step_coefficients(*(np.float64(v) for v in (a_t, s_t, 1.0, 0.0)),
                                    sampler="ddim", eta=0.0, prediction=prediction)
        if s_s == 0.0:
            rows.append(list(x0_step) + [0.0, 0.0, 1.0, 0.0])
            continue
        h = math.log(a_s / s_s) - math.log(a_t / s_t)
        d = [1.0, 0.0] if h_prev is None else [1.0 + 0.5 / (h_prev / h), 0.5 / (h_prev / h)]
        rows.append(list(x0_step) + [s_s / s_t, a_s * math.expm1(-h)] + d)
        h_prev = h
    table = np.array(rows, dtype=np.float64)
    if not np.isfinite(table).all():
        raise ValueError(f"the coefficients of {sampler} over {steps} steps are not finite")
    return table


# ------------------------------------------------------------------ sampling settings
class SettingError(ValueError):
    """A sampling setting that breaks its rule; ``rule`` says the rule alone."""

    def __init__(self, label: str, rule: str, value):
        self.rule = rule
        super().__init__(f"{label}: {rule}, got {value!r}")


def _real(value, low: float, high: float = math.inf, low_open: bool = False):
    """value as a float when it is a real number in [low, high] ((low, high] with
    low_open), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    value = float(value)
    return value if (low < value if low_open else low <= value) and value <= high else None


def _sampler(value):
    name = SAMPLER_ALIASES.get(value, value) if isinstance(value, str) else None
    return name if name in SAMPLERS else None


# setting -> (its rule, the canonical value or None when the value breaks the rule)
_RULES = {
    "sampler": (f"must be one of {', '.join(SAMPLERS)} (or {', '.join(SAMPLER_ALIASES)})", _sampler),
    "steps": ("must be a positive integer",
              lambda v: v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None),
    "guidance": ("must be a number >= 0 (1 = no guidance)", lambda v: _real(v, 0.0)),
    "eta": ("must be in [0, 1]", lambda v: _real(v, 0.0, 1.0)),
    "threshold": (f"must be one of {', '.join(THRESHOLDS)}",
                  lambda v: v if isinstance(v, str) and v in THRESHOLDS else None),
    "percentile": ("must be a fraction in (0, 1] (the paper's 99.5% is 0.995)",
                   lambda v: _real(v, 0.0, 1.0, low_open=True)),
    "aug_level": ("must be in [0, 1]", lambda v: _real(v, 0.0, 1.0)),
    "start": ("must be a time in (0, 1] (1 = from pure noise)",
              lambda v: _real(v, 0.0, 1.0, low_open=True)),
}


def check_setting(name: str, value):
    """One sampling setting checked against its rule, in its canonical form (sampler
    aliases resolved, numbers as float, steps as int); SettingError (a ValueError)
    otherwise, whose ``rule`` callers may word in their own terms (the CLI's flags)."""
    if name not in _RULES:
        hint = f" (now spelled {_LEGACY_NAMES[name]!r})" if name in _LEGACY_NAMES else ""
        raise ValueError(f"unknown sampling setting {name!r}{hint}; known: {list(_RULES)}")
    rule, canonical = _RULES[name]
    out = canonical(value)
    if out is None:
        raise SettingError(name, rule, value)
    return out


@dataclass(frozen=True)
class SamplingConfig:
    """How one stage samples. Defaults follow the paper where it gives numbers
    (dynamic thresholding at p = 99.5%, aug level 0); it gives no step counts.
    guidance w: pred = w * pred(text) + (1 - w) * pred(no text), w >= 0, 1 = off.
    start: the time the run starts from. 1 (the default, every base stage) is pure noise;
    below 1, for super-resolution stages only, the run starts from the stage's upsampled
    input diffused to that time and takes ``steps`` steps from there to 0 (a truncated
    start, as in Chung et al. 2022, "Come-Closer-Diffuse-Faster")."""
    sampler: str = "ddpm"
    steps: int = 64
    guidance: float = 1.0
    eta: float = 0.0
    threshold: str = "dynamic"
    percentile: float = 0.995
    aug_level: float = 0.0
    start: float = 1.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_setting(f.name, getattr(self, f.name)))

    def replace(self, **changes) -> "SamplingConfig":
        unknown = set(changes) - set(SAMPLING_SETTINGS)
        if unknown:
            hints = [f"{k} (now {_LEGACY_NAMES[k]!r})" if k in _LEGACY_NAMES else k for k in sorted(unknown)]
            raise ValueError(f"unknown sampling settings: {hints}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> "SamplingConfig":
        """From a stored config (a checkpoint's, JSON), old spellings included."""
        return cls().replace(**normalize_names(stored))


SAMPLING_SETTINGS = tuple(f.name for f in dataclasses.fields(SamplingConfig))


def normalize_names(settings: Mapping[str, Any]) -> Dict[str, Any]:
    """Stored settings with old spellings renamed (``guidance_scale`` -> ``guidance``)."""
    out = {}
    for key, value in settings.items():
        new = _LEGACY_NAMES.get(key, key)
        if new in out:
            raise ValueError(f"sampling settings give both {new!r} and its old spelling {key!r}")
        out[new] = value
    return out


def check_sampling_overrides(settings: Mapping[str, Any]) -> None:
    """Settings as the pipeline and the eval systems take them: each a single value (every
    stage) or a list with one value per stage, None for the stage's default."""
    for name, value in settings.items():
        if name not in SAMPLING_SETTINGS:
            check_setting(name, value)          # raises, naming the known settings
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None:
                check_setting(name, v)
