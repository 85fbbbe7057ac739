"""Shared pieces of the Pallas kernels: TPU tiling facts, block sizing, activations."""
from __future__ import annotations

import jax
import jax.numpy as jnp

LANES = 128          # last dim of a TPU vreg
SUBLANES = 8         # second-to-last dim (float32)
# A block of this many bytes (float32) per operand leaves room for double buffering
# of several operands in the 16 MiB of VMEM of a TPU-v4 core.
BLOCK_BYTES = 1 << 20


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(n: int, multiple: int) -> int:
    return cdiv(n, multiple) * multiple


def row_block(rows: int, row_bytes: int, max_bytes: int = BLOCK_BYTES) -> int:
    """Rows per block for an (rows, width) operand: a multiple of 8 that keeps the
    block under max_bytes, or all rows when they fit (a block may always span the
    whole dimension). The grid is cdiv(rows, block); kernels mask the last block."""
    cap = max(SUBLANES, (max_bytes // max(row_bytes, 1)) // SUBLANES * SUBLANES)
    return rows if rows <= cap else cap


def valid_rows(block_index, block_rows: int, total_rows: int):
    """(block_rows, 1) bool: which rows of this block lie inside the array."""
    row = jax.lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)
    return row + block_index * block_rows < total_rows


def activate(z, activation: str):
    """act(z); gelu is the exact erf form."""
    if activation == "silu":
        return z * jax.nn.sigmoid(z)
    if activation == "gelu":
        return z * (0.5 * (1.0 + jax.lax.erf(z * 0.7071067811865476)))
    return z


def activation_grad(z, activation: str):
    """act'(z)."""
    if activation == "silu":
        sig = jax.nn.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))
    if activation == "gelu":
        cdf = 0.5 * (1.0 + jax.lax.erf(z * 0.7071067811865476))
        return cdf + z * (0.3989422804014327 * jnp.exp(-0.5 * z * z))
    return jnp.ones_like(z)
