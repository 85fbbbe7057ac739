"""The framework-neutral core: rules that the torch path and the JAX path share, in plain
Python and numpy (no torch or JAX import; tests/ops/test_layering.py checks it).

    names.py      sampler, threshold, prediction and activation names; conventions
    checks.py     argument validators (errors name the argument)
    schedules.py  the noise schedules' log-SNR and alpha/sigma, for numpy, jax.numpy or torch
    sampling.py   the time grid, one step's coefficients, a whole run's coefficient
                  table, SamplingConfig (the one validator of sampling settings)
"""
from .checks import check_attention_shapes, check_choice, check_float, check_percentile, check_positive_int
from .names import (
    ACTIVATIONS,
    COMPILE_MODES,
    MASKED_ROW_LSE,
    PREDICTIONS,
    SAMPLER_ALIASES,
    SAMPLERS,
    STEP_SAMPLERS,
    THRESHOLDS,
)
from .sampling import (
    SAMPLING_SETTINGS,
    SamplingConfig,
    SettingError,
    alpha_sigma_at,
    check_sampling_overrides,
    check_setting,
    coefficient_table,
    cubic_resize_matrix,
    normalize_names,
    step_coefficients,
    time_grid,
)
from .schedules import SCHEDULES, alpha_sigma, diffusion_config, logsnr, schedule_config

__all__ = [
    "ACTIVATIONS", "COMPILE_MODES", "MASKED_ROW_LSE", "PREDICTIONS", "SAMPLERS", "SAMPLER_ALIASES", "SAMPLING_SETTINGS",
    "SCHEDULES", "STEP_SAMPLERS", "THRESHOLDS", "SamplingConfig", "SettingError", "alpha_sigma",
    "alpha_sigma_at",
    "check_attention_shapes", "check_choice", "check_float", "check_percentile", "check_positive_int",
    "check_sampling_overrides", "check_setting", "coefficient_table", "cubic_resize_matrix",
    "diffusion_config", "logsnr", "normalize_names",
    "schedule_config",
    "step_coefficients", "time_grid",
]
