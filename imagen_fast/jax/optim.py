"""The torch trainer's optimizer maths in JAX, step for step, so a JAX run and a torch
run with the same settings update alike and their checkpoints resume each other.

* ``adamw_update``: torch.optim.AdamW (decoupled weight decay p *= 1 - lr wd,
  bias-corrected moments, eps added to sqrt(v_hat)); state names exp_avg /
  exp_avg_sq / step as torch's state_dict.
* ``clip_by_global_norm``: torch.nn.utils.clip_grad_norm_ (coefficient
  max_norm / (norm + 1e-6), never above 1); returns the pre-clip norm.
* ``ema_update``: the trainer's EMA with its warmup, min(decay, (1 + step) / (10 + step)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def adamw_init(params):
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return {"exp_avg": zeros, "exp_avg_sq": jax.tree_util.tree_map(jnp.zeros_like, params)}


def adamw_update(params, grads, state, step, lr, *, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0):
    """One AdamW step; ``step`` is the 1-based update count. Returns (params, state)."""
    b1, b2 = betas
    step = jnp.asarray(step, jnp.float32)
    bc1 = 1 - b1 ** step
    bc2_sqrt = jnp.sqrt(1 - b2 ** step)

    def one(p, g, m, v):
        g = g.astype(jnp.float32)
        p = p * (1 - lr * weight_decay)
        m = m + (g - m) * (1 - b1)                    # torch: exp_avg.lerp_(grad, 1 - beta1)
        v = v * b2 + g * g * (1 - b2)
        p = p - (lr / bc1) * m / (jnp.sqrt(v) / bc2_sqrt + eps)
        return p, m, v

    out = jax.tree_util.tree_map(one, params, grads, state["exp_avg"], state["exp_avg_sq"])
    pick = lambda i: jax.tree_util.tree_map(lambda _, o: o[i], params, out)
    return pick(0), {"exp_avg": pick(1), "exp_avg_sq": pick(2)}


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                        for g in jax.tree_util.tree_leaves(tree)))


def clip_by_global_norm(grads, max_norm: float):
    """(clipped grads, norm before clipping); max_norm 0 disables clipping."""
    norm = global_norm(grads)
    if not max_norm:
        return grads, norm
    coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
    return jax.tree_util.tree_map(lambda g: g * coef.astype(g.dtype), grads), norm


def ema_update(ema, params, step, decay: float):
    """shadow += (1 - d) (param - shadow), d = min(decay, (1 + step) / (10 + step)),
    ``step`` the 0-based index of the step just taken."""
    step = jnp.asarray(step, jnp.float32)
    d = jnp.minimum(decay, (1 + step) / (10 + step))
    return jax.tree_util.tree_map(lambda s, p: s + (p.astype(jnp.float32) - s) * (1 - d), ema, params)
