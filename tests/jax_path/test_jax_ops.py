"""imagen_fast.jax.ops: the Pallas kernels (in Pallas' interpreter on CPU) and the jnp
definitions against the torch float64 references, forward and gradients; the TPU
lowering of every kernel (jax.export for platform "tpu" on this CPU host); argument
checks and implementation selection."""
import numpy as np
import pytest
import torch
from support.jax_util import jax, jnp, nchw, nhwc, to_jax, to_torch
from support.numerics import assert_close_to_reference, group_norm_inputs, randn

from imagen_fast.core import MASKED_ROW_LSE
from imagen_fast.jax import ops
from imagen_fast.jax.kernels import attention as attention_kernel
from imagen_fast.jax.kernels import group_norm as group_norm_kernel
from imagen_fast.jax.kernels import threshold as threshold_kernel
from imagen_fast.ops import reference


def _vjp_both(fn, args, cot):
    """(out, grads) of fn at args with cotangent cot, in one compiled call."""
    @jax.jit
    def run(args, cot):
        out, pull = jax.vjp(fn, *args)
        return out, pull(cot)
    return run(args, cot)


def _torch_vjp64(fn, args, cot):
    leaves = [None if a is None else a.detach().double().requires_grad_(True) for a in args]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [a for a in leaves if a is not None], cot.double())
    it = iter(grads)
    return out.detach(), [None if a is None else next(it) for a in leaves]


# ----------------------------------------------------------------- group_norm_silu
GN_CASES = [  # (shape NCHW, groups, dtype, activation, film, affine, force small blocks)
    ((2, 48, 7, 9), 6, jnp.float32, "silu", True, True, True),
    ((3, 16, 5, 6), 4, jnp.bfloat16, "gelu", False, True, False),
    ((2, 12, 11), 3, jnp.float32, None, True, False, False),        # 1-D spatial
]


@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: f"{c[0]}-{jnp.dtype(c[2]).name}-{c[3]}")
def test_group_norm_kernel_matches_reference(case, monkeypatch):
    shape, groups, dtype, act, film, affine, small_blocks = case
    if small_blocks:           # several row blocks per sample, the last one partial
        monkeypatch.setattr(group_norm_kernel, "row_block", lambda rows, row_bytes: 16)
    tdt = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16}[dtype]
    x, w, b, s, sh = group_norm_inputs(shape, tdt, film, affine, seed=3)
    dy = randn(*shape, dtype=tdt, generator=torch.Generator().manual_seed(4))
    args_t = [x, w, b, s, sh]
    ref, ref_grads = _torch_vjp64(
        lambda *a: reference.group_norm_silu(a[0], groups, a[1], a[2], 1e-5, a[3], a[4], act),
        args_t, dy)
    args_j = [to_jax(nhwc(x))] + [to_jax(a) for a in args_t[1:]]
    cot = to_jax(nhwc(dy))
    outs = {}
    for impl in ("interpret", "jnp"):
        outs[impl] = _vjp_both(
            lambda *a, impl=impl: ops.group_norm_silu(a[0], groups, a[1], a[2], 1e-5, a[3], a[4],
                                                      act, impl=impl), args_j, cot)
    names = ["x", "weight", "bias", "scale", "shift"]
    (out, grads), (base, base_grads) = outs["interpret"], outs["jnp"]
    assert out.dtype == dtype
    assert_close_to_reference(nchw(to_torch(out)), ref, nchw(to_torch(base)), what="y")
    for name, g, gb, gr in zip(names, grads, base_grads, ref_grads):
        if gr is None:
            assert g is None
            continue
        g, gb = to_torch(g), to_torch(gb)
        if name == "x":
            g, gb = nchw(g), nchw(gb)
        assert_close_to_reference(g, gr, gb, what=f"d{name}")


# ----------------------------------------------------------------------- attention
ATTN_CASES = [  # (B, H, Lq, Lk, D, dtype, masked, block_q)
    (3, 2, 20, 150, 40, jnp.float32, True, 8),     # 3 query blocks, 2 key blocks, padded
    (2, 3, 9, 77, 16, jnp.bfloat16, False, 128),   # text-length keys padded to 128
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"{c[2]}x{c[3]}-{jnp.dtype(c[5]).name}")
def test_attention_kernel_matches_reference(case):
    b, h, lq, lk, d, dtype, masked, block_q = case
    tdt = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(5)
    q, k, v = (randn(b, h, l, d, dtype=tdt, generator=g) for l in (lq, lk, lk))
    do = randn(b, h, lq, d, dtype=tdt, generator=g)
    mask = None
    if masked:
        mask = torch.rand(b, lk, generator=g) > 0.4
        mask[1] = False                                   # a dropped prompt: no key at all
        mask[2, :3] = True
    ref, ref_grads = _torch_vjp64(lambda q, k, v: reference.attention(q, k, v, mask), [q, k, v], do)
    jmask = None if mask is None else to_jax(mask)
    sizes = attention_kernel.BlockSizes(block_q, 128)
    outs = {impl: _vjp_both(lambda q, k, v, impl=impl: ops.attention(
        q, k, v, jmask, impl=impl, block_sizes=sizes), [to_jax(t) for t in (q, k, v)], to_jax(do))
        for impl in ("interpret", "jnp")}
    (out, grads), (base, base_grads) = outs["interpret"], outs["jnp"]
    assert out.dtype == dtype
    assert_close_to_reference(to_torch(out), ref, to_torch(base), what="out")
    for name, gk, gb, gr in zip("qkv", grads, base_grads, ref_grads):
        assert_close_to_reference(to_torch(gk), gr, to_torch(gb), what=f"d{name}")
    if masked:   # the fully masked batch: zeros and zero gradients, exactly
        assert not jnp.any(out[1]) and not jnp.any(grads[0][1])
        assert not jnp.any(grads[1][1]) and not jnp.any(grads[2][1])


def test_attention_kernel_fully_masked_row_lse_convention():
    """The log-sum-exp the Pallas kernel saves for its backward: log of the sum over the
    attended keys, and imagen_fast.core.MASKED_ROW_LSE (-inf) for a query with no key, as
    every torch backend (tests/ops/test_ops.py); the backward stays finite and zero there."""
    b, h, lq, lk, d, scale = 2, 2, 8, 128, 16, 0.4       # whole blocks: nothing padded
    g = torch.Generator().manual_seed(7)
    q, k, v = (randn(b, h, n, d, generator=g) for n in (lq, lk, lk))
    mask = torch.rand(b, lk, generator=g) > 0.3
    mask[1] = False
    jq, jk, jv = (to_jax(t) for t in (q, k, v))
    jmask = to_jax(mask).astype(jnp.int32)[:, None, :]
    out, lse = attention_kernel._forward(jq, jk, jv, jmask, scale, lq, lk, True, True)
    lse = np.asarray(lse)[..., 0]                         # lanes hold copies
    assert (lse[1] == MASKED_ROW_LSE).all() and (np.asarray(out)[1] == 0).all()
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    expected = torch.logsumexp(scores.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
    np.testing.assert_allclose(lse[0], expected[0].numpy(), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda a, b_, c: ops.attention(a, b_, c, to_jax(mask), scale, impl="interpret").sum(),
                     argnums=(0, 1, 2))(jq, jk, jv)
    assert all(np.isfinite(np.asarray(gr)).all() for gr in grads)
    assert (np.asarray(grads[0])[1] == 0).all()


def test_attention_block_sizes_are_validated():
    with pytest.raises(ValueError, match="block_k"):
        attention_kernel.BlockSizes(128, 100)
    with pytest.raises(ValueError, match="block_q"):
        attention_kernel.BlockSizes(12, 128)


# ----------------------------------------------------------------- dynamic threshold
@pytest.mark.parametrize("shape,dtype,percentiles,block_rows", [
    ((3, 5, 7, 3), jnp.float32, (0.995, 1.0), None),
    ((2, 3, 32, 33), jnp.float32, (0.995,), 8),       # several row blocks per sample
    ((2, 9, 11, 3), jnp.bfloat16, (0.9,), None),
    ((2, 300), jnp.float16, (0.0, 0.3), None),
])
def test_dynamic_threshold_kernel_is_exact(shape, dtype, percentiles, block_rows, monkeypatch):
    if block_rows:
        monkeypatch.setattr(threshold_kernel, "MAX_BLOCK_ROWS", block_rows)
    tdt = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16, jnp.float16: torch.float16}[dtype]
    x = randn(*shape, dtype=tdt, generator=torch.Generator().manual_seed(6), scale=1.5)
    x_j = to_jax(x)
    flat64 = x.double().reshape(shape[0], -1).abs()
    for p in percentiles:
        run = jax.jit(lambda x, p=p: (threshold_kernel.percentile_abs(x, p, interpret=True),
                                      ops.dynamic_threshold(x, p, 1.0, impl="interpret"),
                                      ops.dynamic_threshold(x, p, 1.0, impl="jnp")))
        s, out, base = run(x_j)
        # the selected order statistics are exact: only the interpolation rounds
        expected = torch.quantile(flat64, p, dim=1)
        assert torch.allclose(to_torch(s).double(), expected, rtol=2e-7, atol=0)
        ref = reference.dynamic_threshold(x.double(), p, 1.0)
        assert out.dtype == dtype
        assert_close_to_reference(to_torch(out), ref, to_torch(base), what=f"p={p}")


def test_dynamic_threshold_kernel_gradient_matches_sort():
    x = to_jax(randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7)))

    def loss(impl):
        return jax.jit(jax.grad(lambda x: (ops.dynamic_threshold(x, 0.9, 0.5, impl=impl) ** 2).sum()))

    g_kernel, g_sort = loss("interpret")(x), loss("jnp")(x)
    assert jnp.abs(g_sort).max() > 1
    assert jnp.allclose(g_kernel, g_sort, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ TPU lowering
def _lowered(fn, *args, platform="tpu"):
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    return jax.export.export(jax.jit(fn), platforms=[platform])(*specs).mlir_module()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_group_norm_lowers_to_mosaic_for_tpu(dtype):
    x = jnp.ones((2, 16, 16, 64), dtype)
    w = jnp.ones((64,))
    s = jnp.ones((2, 64))

    def train(x, w, s):
        return jax.grad(lambda x, w, s: ops.group_norm_silu(x, 8, w, w, 1e-5, s, s).astype(
            jnp.float32).sum(), argnums=(0, 1, 2))(x, w, s)

    forward = _lowered(lambda x, w, s: ops.group_norm_silu(x, 8, w, w, 1e-5, s, s), x, w, s)
    assert forward.count("tpu_custom_call") == 2            # statistics, then apply
    assert _lowered(train, x, w, s).count("tpu_custom_call") >= 3   # + backward sums, dx
    assert "tpu_custom_call" not in _lowered(train, x, w, s, platform="cpu")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_lowers_to_mosaic_for_tpu(dtype):
    q = jnp.ones((2, 4, 256 + 8, 64), dtype)           # image tokens + text, unaligned
    k = jnp.ones((2, 4, 256 + 77, 64), dtype)
    mask = jnp.ones((2, 256 + 77), bool)

    def train(q, k, mask):
        return jax.grad(lambda q, k: ops.attention(q, k, k, mask).astype(jnp.float32).sum(),
                        argnums=(0, 1))(q, k)

    assert _lowered(lambda q, k, m: ops.attention(q, k, k, m), q, k, mask).count("tpu_custom_call") == 1
    assert _lowered(train, q, k, mask).count("tpu_custom_call") == 3   # forward, dq, dk+dv
    assert _lowered(lambda q, k: ops.attention(q, k, k), q, k).count("tpu_custom_call") == 1
    assert "tpu_custom_call" not in _lowered(train, q, k, mask, platform="cpu")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dynamic_threshold_lowers_to_mosaic_for_tpu(dtype):
    x = jnp.ones((4, 3, 64, 64), dtype)
    text = _lowered(lambda x: ops.dynamic_threshold(x, 0.995), x)
    assert text.count("tpu_custom_call") == 1
    assert "sort" not in text.replace("tpu_custom_call", "")
    assert "tpu_custom_call" not in _lowered(lambda x: ops.dynamic_threshold(x, 0.995), x,
                                             platform="cpu")


# -------------------------------------------------------------- checks, selection
def test_argument_errors_name_the_argument():
    x = jnp.ones((2, 4, 4, 8))
    with pytest.raises(ValueError, match="num_groups"):
        ops.group_norm_silu(x, 3)
    with pytest.raises(TypeError, match="num_groups"):
        ops.group_norm_silu(x, 2.0)
    with pytest.raises(ValueError, match="scale"):
        ops.group_norm_silu(x, 2, scale=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="weight"):
        ops.group_norm_silu(x, 2, weight=jnp.ones((4,)))
    with pytest.raises(ValueError, match="activation"):
        ops.group_norm_silu(x, 2, activation="relu")
    with pytest.raises(ValueError, match="eps"):
        ops.group_norm_silu(x, 2, eps=0.0)
    with pytest.raises(TypeError, match="x"):
        ops.group_norm_silu(jnp.ones((2, 4), jnp.int32), 2)
    q = jnp.ones((1, 2, 5, 8))
    with pytest.raises(ValueError, match="key_padding_mask"):
        ops.attention(q, q, q, jnp.ones((1, 4), bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        ops.attention(q, q, q, jnp.ones((1, 5)))
    with pytest.raises(TypeError, match="k must have q's dtype"):
        ops.attention(q, q.astype(jnp.bfloat16), q)
    with pytest.raises(ValueError, match="v must"):
        ops.attention(q, q, q[:, :, :3])
    with pytest.raises(ValueError, match="percentile"):
        ops.dynamic_threshold(x, 99.5)
    with pytest.raises(ValueError, match="percentile"):
        ops.dynamic_threshold(x, float("nan"))
    with pytest.raises(ValueError, match="min_value"):
        ops.dynamic_threshold(x, 0.9, 0.0)
    with pytest.raises(ValueError, match="impl"):
        ops.dynamic_threshold(x, impl="triton")


def test_impl_selection_follows_use_impl():
    x = jnp.ones((2, 4, 4, 8))
    assert ops.default_impl() == "auto"
    with ops.use_impl("interpret"):
        assert ops.default_impl() == "interpret"
        jaxpr = str(jax.make_jaxpr(lambda x: ops.group_norm_silu(x, 2))(x))
        assert "pallas_call" in jaxpr and "platform_index" not in jaxpr
    with ops.use_impl("jnp"):
        assert "pallas_call" not in str(jax.make_jaxpr(lambda x: ops.group_norm_silu(x, 2))(x))
    # "auto" holds both and lets the platform pick at lowering time
    jaxpr = str(jax.make_jaxpr(lambda x: ops.group_norm_silu(x, 2))(x))
    assert "pallas_call" in jaxpr and "platform_index" in jaxpr
    with pytest.raises(ValueError, match="impl"):
        with ops.use_impl("gpu"):
            pass
