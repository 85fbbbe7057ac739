"""imagen_fast.jax.ops: the JAX path's one door to the kernels.

The same ops, names and arguments as ``imagen_fast.ops``, with images channels-last
(N, *spatial, C) as is natural in JAX (attention keeps (B, H, L, D)):

    group_norm_silu(x, num_groups, weight, bias, eps, scale, shift, activation)
    attention(q, k, v, key_padding_mask, scale)
    dynamic_threshold(x0, percentile, min_value)

Each checks its arguments (ValueError / TypeError naming the argument) and picks its
implementation per platform at lowering time (``jax.lax.platform_dependent``), so one
traced program holds both and the compiler keeps the one for its platform:

* ``impl="auto"`` (default): the Pallas kernel on TPU, the plain jnp definition
  (``imagen_fast.jax.reference``; XLA fuses it) everywhere else;
* ``"pallas"``: the Pallas kernel everywhere, compiled on TPU and run by Pallas'
  interpreter elsewhere (how CI tests the kernels on CPU);
* ``"interpret"``: the kernel in the interpreter on every platform;
* ``"jnp"``: the jnp definition everywhere.

The default comes from ``use_impl(...)`` or IMAGEN_FAST_JAX_IMPL; the choice is made
when a function is traced, so a jitted function keeps the choice of its first trace.
All three are differentiable (the kernels through custom_vjp / custom_jvp).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from typing import Iterator, Optional

import jax
import jax.numpy as jnp

from ..core import ACTIVATIONS, check_attention_shapes, check_float, check_percentile
from . import reference
from .kernels import attention as _attention
from .kernels import group_norm as _group_norm
from .kernels import threshold as _threshold

IMPLS = ("auto", "pallas", "interpret", "jnp")
FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))
_state = threading.local()


def _check_impl(name) -> str:
    if name not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {name!r}")
    return name


def default_impl() -> str:
    """The implementation ops use when called with impl=None."""
    name = getattr(_state, "impl", None) or os.environ.get("IMAGEN_FAST_JAX_IMPL") or "auto"
    return _check_impl(name)


@contextlib.contextmanager
def use_impl(name: str) -> Iterator[None]:
    """Ops traced inside the block use ``name`` (one of IMPLS) unless given impl=."""
    prev = getattr(_state, "impl", None)
    _state.impl = _check_impl(name)
    try:
        yield
    finally:
        _state.impl = prev


def _dispatch(impl: Optional[str], kernel, jnp_fn, *operands):
    """kernel(*operands, interpret=bool) or jnp_fn(*operands), chosen per platform."""
    impl = default_impl() if impl is None else _check_impl(impl)
    if impl == "jnp":
        return jnp_fn(*operands)
    if impl == "interpret":
        return kernel(*operands, interpret=True)
    compiled = functools.partial(kernel, interpret=False)
    fallback = jnp_fn if impl == "auto" else functools.partial(kernel, interpret=True)
    return jax.lax.platform_dependent(*operands, tpu=compiled, default=fallback)


# --------------------------------------------------------------------------- checks
def _check_array(t, name: str, *, ndim=None, min_ndim=None, dtypes=FLOAT_DTYPES):
    if not hasattr(t, "shape") or not hasattr(t, "dtype"):
        raise TypeError(f"{name} must be a JAX array, got {type(t).__name__}")
    if dtypes is not None and jnp.dtype(t.dtype) not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    return jnp.asarray(t)


def _channel_param(t, name: str, c: int):
    if t is None:
        return None
    t = _check_array(t, name, ndim=1)
    if t.shape[0] != c:
        raise ValueError(f"{name} must have shape (C,) = ({c},), got {tuple(t.shape)}")
    return t


def _film_param(t, name: str, n: int, c: int, ndim: int):
    """(N, C), or (N, 1, ..., 1, C) with x's rank, -> (N, C)."""
    if t is None:
        return None
    t = _check_array(t, name)
    ok = t.shape == (n, c) or (t.ndim == ndim and t.shape[0] == n and t.shape[-1] == c
                               and all(s == 1 for s in t.shape[1:-1]))
    if not ok:
        raise ValueError(f"{name} must have shape (N, C) = ({n}, {c}) (or (N, 1, ..., 1, C)), "
                         f"got {tuple(t.shape)}")
    return t.reshape(n, c)


# ------------------------------------------------------------------------------ ops
def group_norm_silu(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5,
                    scale=None, shift=None, activation: Optional[str] = "silu", *,
                    impl: Optional[str] = None):
    """GroupNorm + optional FiLM + activation of channels-last x (N, *spatial, C).

    y = act(((x - mean) * rstd * weight + bias) * (1 + scale) + shift), groups of
    C // num_groups consecutive channels, biased variance, statistics in float32.
    weight, bias: (C,) or None; scale, shift: (N, C) or None; activation "silu",
    "gelu" (exact erf form) or None. The output has x's shape and dtype.
    """
    x = _check_array(x, "x", min_ndim=2)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    n, c = x.shape[0], x.shape[-1]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of C={c}, got {num_groups}")
    if x.size == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    eps = check_float(eps, "eps", low=0.0, low_open=True)
    act = "none" if activation is None else activation
    if act not in ACTIVATIONS:
        raise ValueError(f"activation must be 'silu', 'gelu' or None, got {activation!r}")
    weight = _channel_param(weight, "weight", c)
    bias = _channel_param(bias, "bias", c)
    scale = _film_param(scale, "scale", n, c, x.ndim)
    shift = _film_param(shift, "shift", n, c, x.ndim)

    def kernel(x, weight, bias, scale, shift, *, interpret):
        return _group_norm.group_norm_silu(x, num_groups, weight, bias, eps, scale, shift, act,
                                           interpret)

    def plain(x, weight, bias, scale, shift):
        return reference.group_norm_silu(x, num_groups, weight, bias, eps, scale, shift, act)

    return _dispatch(impl, kernel, plain, x, weight, bias, scale, shift)


def attention(q, k, v, key_padding_mask=None, scale: Optional[float] = None, *,
              impl: Optional[str] = None,
              block_sizes: _attention.BlockSizes = _attention.BlockSizes()):
    """softmax(q k^T * scale) v with a key padding mask, flash-style on TPU.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D) in q's dtype. key_padding_mask: (B, Lk) bool,
    True = attend, or None. A query with no key to attend to outputs zeros and gets
    zero gradients. scale defaults to 1 / sqrt(D). block_sizes: the Pallas tiles.
    """
    q = _check_array(q, "q", ndim=4)
    k = _check_array(k, "k", ndim=4)
    v = _check_array(v, "v", ndim=4)
    for t, name in ((k, "k"), (v, "v")):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    b, h, lq, d = check_attention_shapes(q.shape, k.shape, v.shape)
    if key_padding_mask is not None:
        key_padding_mask = _check_array(key_padding_mask, "key_padding_mask", ndim=2,
                                        dtypes=(jnp.dtype(jnp.bool_),))
        if tuple(key_padding_mask.shape) != (b, k.shape[2]):
            raise ValueError(f"key_padding_mask must have shape (B, Lk) = ({b}, {k.shape[2]}), "
                             f"got {tuple(key_padding_mask.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else check_float(scale, "scale", low=0.0,
                                                                  low_open=True)

    def kernel(q, k, v, mask, *, interpret):
        return _attention.attention(q, k, v, mask, scale, block_sizes=block_sizes,
                                    interpret=interpret)

    def plain(q, k, v, mask):
        return reference.attention(q, k, v, mask, scale)

    return _dispatch(impl, kernel, plain, q, k, v, key_padding_mask)


def dynamic_threshold(x0, percentile: float = 0.995, min_value: float = 1.0, *,
                      impl: Optional[str] = None):
    """Imagen's dynamic thresholding per sample: s = percentile of |x0| over all
    non-batch axes, exact, with torch.quantile's linear interpolation; s = max(s,
    min_value); returns clip(x0, -s, s) / s in x0's dtype. On TPU the percentile is
    selected bit by bit (no sort); elsewhere by jnp.sort. percentile is a fraction."""
    x0 = _check_array(x0, "x0", min_ndim=2)
    if x0.size == 0:
        raise ValueError(f"x0 must not be empty, got shape {tuple(x0.shape)}")
    p = check_percentile(percentile)
    m = check_float(min_value, "min_value", low=0.0, low_open=True)

    def kernel(x0, *, interpret):
        return _threshold.dynamic_threshold(x0, p, m, interpret=interpret)

    return _dispatch(impl, kernel, lambda x0: reference.dynamic_threshold(x0, p, m), x0)


__all__ = ["ACTIVATIONS", "IMPLS", "attention", "default_impl", "dynamic_threshold",
           "group_norm_silu", "use_impl"]
