"""Shared pieces of the JAX tests: torch <-> JAX conversion for comparing against
the torch float64 references (tests/support/numerics.py's tolerance rule applies as is)."""
import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
jnp = jax.numpy

TORCH_OF = {jnp.dtype(jnp.float32): torch.float32, jnp.dtype(jnp.bfloat16): torch.bfloat16,
            jnp.dtype(jnp.float16): torch.float16}


def to_jax(t, dtype=None):
    """A torch tensor as a JAX array (in its dtype, or ``dtype``)."""
    if t is None:
        return None
    arr = jnp.asarray(t.detach().double().cpu().numpy())
    if dtype is None:
        dtype = {torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16,
                 torch.bool: jnp.bool_}.get(t.dtype, jnp.float32)
    return arr.astype(dtype)


def to_torch(a):
    """A JAX array as a torch tensor of the same dtype (bfloat16 via float32)."""
    if a is None:
        return None
    dt = jnp.dtype(a.dtype)
    out = torch.from_numpy(np.asarray(a.astype(jnp.float32) if dt == jnp.bfloat16 else a).copy())
    return out.to(TORCH_OF.get(dt, out.dtype))


def nchw(t):
    """channels-last (N, *spatial, C) torch tensor -> (N, C, *spatial)."""
    return t.movedim(-1, 1)


def nhwc(t):
    return t.movedim(1, -1)
