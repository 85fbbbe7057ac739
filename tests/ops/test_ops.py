"""The op contract, run against every backend (torch, cpu, triton; cuda on a GPU).

Each op is compared with imagen_fast.ops.reference evaluated in float64 on the same
inputs, with the tolerance rule of tests/support/numerics.py. Gradients of the training ops
are compared with autograd through the reference.
"""
import math

import pytest
import torch

from support.device import DEVICE, require_op, small
from support.numerics import assert_close_to_reference, gen, group_norm_inputs, randn

from imagen_fast import ops
from imagen_fast.core import MASKED_ROW_LSE
from imagen_fast.ops import dispatch, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GEN_SEED = 1234


def _gen(seed=GEN_SEED):
    return gen(seed)


def _to_layout(x, channels_last):
    if not channels_last:
        return x.contiguous()
    fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
    return x.contiguous(memory_format=fmt)


# ----------------------------------------------------------------- group_norm_silu
GN_SHAPES = [  # (shape, groups); odd sizes on purpose
    ((2, 8, 5, 7), 4),
    ((1, 96, 7, 9), 32),
    ((5, 6, 3, 3), 3),
    ((3, 12, 11), 3),          # 1-D spatial
    ((2, 8, 3, 4, 5), 2),      # 3-D spatial
]
GN_SMALL = [((2, 8, 5, 7), 4), ((1, 12, 3, 5), 3)]


def _gn_inputs(shape, dtype, film, affine, seed=0):
    return group_norm_inputs(shape, dtype, film, affine, seed)


def _dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("film,affine,activation", [
    (True, True, "silu"), (False, True, "silu"), (True, False, "gelu"),
    (False, False, None), (True, True, "gelu"),
])
def test_group_norm_silu_forward(backend, poison, dtype, channels_last, film, affine, activation):
    shapes = GN_SMALL if small(backend) else GN_SHAPES
    for shape, groups in shapes:
        if channels_last and len(shape) not in (4, 5):
            continue
        x, w, b, s, sh = _gn_inputs(shape, dtype, film, affine)
        xd = _to_layout(x.to(DEVICE), channels_last)
        wd, bd, sd, shd = _dev(w, b, s, sh)
        y = ops.group_norm_silu(xd, groups, wd, bd, scale=sd, shift=shd, activation=activation)
        assert y.dtype == dtype and y.shape == x.shape
        assert ops.is_channels_last(y) == ops.is_channels_last(xd), "layout not kept"
        d64 = lambda t: None if t is None else t.double()  # noqa: E731
        ref = reference.group_norm_silu(x.double(), groups, d64(w), d64(b), 1e-5, d64(s),
                                        d64(sh), activation)
        lp = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        same = reference.group_norm_silu(x, groups, lp(w), lp(b), 1e-5, lp(s), lp(sh), activation)
        assert_close_to_reference(y.cpu(), ref, same, what=f"y {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu", None])
def test_group_norm_silu_backward(backend, dtype, channels_last, activation):
    shape, groups = ((2, 8, 5, 7), 4) if small(backend) else ((2, 96, 7, 9), 32)
    x, w, b, s, sh = _gn_inputs(shape, dtype, True, True, seed=1)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, w, b, s, sh)]
    xd = _to_layout(leaves[0], channels_last)
    y = ops.group_norm_silu(xd, groups, leaves[1], leaves[2], scale=leaves[3], shift=leaves[4],
                            activation=activation)
    gy = randn(*shape, dtype=dtype, generator=_gen(7)).to(DEVICE)
    grads = torch.autograd.grad(y, leaves, gy)

    ref_leaves = [t.double().requires_grad_() for t in (x, w, b, s, sh)]
    ref = reference.group_norm_silu(ref_leaves[0], groups, *ref_leaves[1:3], 1e-5,
                                    *ref_leaves[3:], activation)
    ref_grads = torch.autograd.grad(ref, ref_leaves, gy.cpu().double())
    lp_leaves = [t.to(dtype).requires_grad_() for t in (x, w, b, s, sh)]
    lp = reference.group_norm_silu(lp_leaves[0], groups, *lp_leaves[1:3], 1e-5, *lp_leaves[3:],
                                   activation)
    lp_grads = torch.autograd.grad(lp, lp_leaves, gy.cpu())
    for name, g, r, t, leaf in zip(["x", "weight", "bias", "scale", "shift"], grads, ref_grads,
                                   lp_grads, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        # Parameter gradients are sums over N*H*W terms: allow the sum's rounding.
        floor = None if name == "x" else 1e-4 * math.sqrt(x.numel()) * r.abs().max().item()
        assert_close_to_reference(g.cpu(), r, t, what=f"grad {name}", floor=floor)


def test_group_norm_silu_partial_grads(backend):
    """Only the inputs that need a gradient get one; missing params are fine."""
    x = randn(2, 8, 3, 5, generator=_gen(3)).to(DEVICE).requires_grad_()
    s = randn(2, 8, generator=_gen(4)).to(DEVICE)
    y = ops.group_norm_silu(x, 2, scale=s)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    ref_x = x.detach().cpu().double().requires_grad_()
    (rx,) = torch.autograd.grad(reference.group_norm_silu(ref_x, 2, scale=s.cpu().double()).sum(),
                                [ref_x])
    assert_close_to_reference(gx.cpu(), rx, floor=1e-5)


def test_group_norm_silu_gradcheck(backend):
    if backend in ("triton", "cuda") and DEVICE.type == "cpu":
        pytest.skip("float64 gradcheck runs on backends torch and cpu")
    x, w, b, s, sh = (t.double().requires_grad_() for t in _dev(*_gn_inputs(
        (2, 6, 3, 4), torch.float64, True, True, seed=5)))
    for act in ("silu", "gelu"):
        assert torch.autograd.gradcheck(
            lambda *a: ops.group_norm_silu(a[0], 3, a[1], a[2], scale=a[3], shift=a[4],
                                           activation=act), (x, w, b, s, sh))


# ------------------------------------------------------------ channel_rms_norm_silu
RMS_SHAPES = [(2, 8, 5, 7), (1, 96, 7, 9), (3, 5, 3, 3), (3, 12, 11), (2, 6, 3, 4, 5)]
RMS_SMALL = [(2, 8, 5, 7), (1, 12, 3, 5)]


def _rms_inputs(shape, dtype, film, affine, seed=0):
    x, w, _, s, sh = group_norm_inputs(shape, dtype, film, affine, seed)
    return x, w, s, sh


def _rms_ref(x, w, s, sh, activation, eps=1e-6, dtype=torch.float64):
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return reference.channel_rms_norm_silu(cast(x), cast(w), eps, cast(s), cast(sh), activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("film,affine,activation", [
    (True, True, "silu"), (False, True, "silu"), (True, False, "gelu"), (False, False, None),
])
def test_channel_rms_norm_forward(backend, poison, dtype, channels_last, film, affine, activation):
    require_op(backend, "channel_rms_norm_silu_fwd")
    for shape in (RMS_SMALL if small(backend) else RMS_SHAPES):
        if channels_last and len(shape) not in (4, 5):
            continue
        x, w, s, sh = _rms_inputs(shape, dtype, film, affine)
        xd = _to_layout(x.to(DEVICE), channels_last)
        y = ops.channel_rms_norm_silu(xd, *_dev(w), 1e-6, *_dev(s, sh), activation=activation)
        assert y.dtype == dtype and y.shape == x.shape
        assert ops.is_channels_last(y) == ops.is_channels_last(xd), "layout not kept"
        ref = _rms_ref(x, w, s, sh, activation)
        same = _rms_ref(x, w, s, sh, activation, dtype=dtype)
        assert_close_to_reference(y.cpu(), ref, same, what=f"y {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu", None])
def test_channel_rms_norm_backward(backend, dtype, channels_last, activation):
    require_op(backend, "channel_rms_norm_silu_fwd")
    shape = (2, 8, 5, 7) if small(backend) else (2, 96, 7, 9)
    x, w, s, sh = _rms_inputs(shape, dtype, True, True, seed=1)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, w, s, sh)]
    y = ops.channel_rms_norm_silu(_to_layout(leaves[0], channels_last), leaves[1], 1e-6,
                                  leaves[2], leaves[3], activation)
    gy = randn(*shape, dtype=dtype, generator=_gen(7)).to(DEVICE)
    grads = torch.autograd.grad(y, leaves, gy)
    ref_leaves = [t.double().requires_grad_() for t in (x, w, s, sh)]
    ref_grads = torch.autograd.grad(_rms_ref(*ref_leaves, activation), ref_leaves, gy.cpu().double())
    lp_leaves = [t.to(dtype).requires_grad_() for t in (x, w, s, sh)]
    lp_grads = torch.autograd.grad(_rms_ref(*lp_leaves, activation, dtype=dtype), lp_leaves, gy.cpu())
    for name, g, r, t, leaf in zip(["x", "weight", "scale", "shift"], grads, ref_grads, lp_grads,
                                   leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        floor = None if name == "x" else 1e-4 * math.sqrt(x.numel()) * r.abs().max().item()
        assert_close_to_reference(g.cpu(), r, t, what=f"grad {name}", floor=floor)


def test_channel_rms_norm_tiny_rms_is_clamped(backend):
    """Positions whose RMS is below eps (here: all zeros, and 1e-9) scale by 1 / eps,
    as F.normalize does; their gradient is the plain rescaled one."""
    require_op(backend, "channel_rms_norm_silu_fwd")
    x = randn(2, 6, 3, 4, generator=_gen(8))
    x[0, :, 1, 2] = 0.0
    x[1, :, 0, :] *= 1e-9
    w = randn(6, generator=_gen(9))
    xd = x.to(DEVICE).requires_grad_()
    y = ops.channel_rms_norm_silu(xd, w.to(DEVICE), 1e-6, activation=None)
    assert_close_to_reference(y.detach().cpu(), _rms_ref(x, w, None, None, None), floor=1e-5)
    gy = randn(*x.shape, generator=_gen(10))
    (gx,) = torch.autograd.grad(y, [xd], gy.to(DEVICE))
    x64 = x.double().requires_grad_()
    (r,) = torch.autograd.grad(_rms_ref(x64, w, None, None, None), [x64], gy.double())
    r = torch.nan_to_num(r)  # F.normalize-style sqrt(0) gives NaN * 0 at the all-zero column
    r[0, :, 1, 2] = (gy[0, :, 1, 2] * w).double() * 1e6
    torch.testing.assert_close(gx.cpu().double(), r, rtol=1e-5, atol=1e-5)


def test_channel_rms_norm_matches_imagen_pytorch_form(backend):
    """F.normalize(x, dim=1) * sqrt(C) * gamma is the op with eps = 1e-12 / sqrt(C)."""
    require_op(backend, "channel_rms_norm_silu_fwd")
    x = randn(2, 16, 5, 3, generator=_gen(11))
    gamma = randn(16, generator=_gen(12))
    expected = torch.nn.functional.normalize(x.double(), dim=1) * 4.0 * gamma.double()[:, None, None]
    y = ops.channel_rms_norm_silu(x.to(DEVICE), gamma.to(DEVICE), 1e-12 / 4.0, activation=None)
    assert_close_to_reference(y.cpu(), expected, torch.nn.functional.normalize(x, dim=1) * 4.0
                              * gamma[:, None, None])


def test_channel_rms_norm_gradcheck(backend):
    require_op(backend, "channel_rms_norm_silu_fwd")
    if backend in ("triton", "cuda") and DEVICE.type == "cpu":
        pytest.skip("float64 gradcheck runs on backends torch and cpu")
    x, w, s, sh = (t.double().to(DEVICE).requires_grad_() for t in _rms_inputs(
        (2, 6, 3, 4), torch.float64, True, True, seed=5))
    for act in ("silu", "gelu"):
        assert torch.autograd.gradcheck(
            lambda *a: ops.channel_rms_norm_silu(a[0], a[1], 1e-6, a[2], a[3], act), (x, w, s, sh))


# ----------------------------------------------------------------------- attention
ATTN_CASES = [  # B, H, Lq, Lk, D
    (2, 2, 5, 7, 8),
    (1, 3, 16, 77, 40),
    (2, 1, 33, 20, 64),
    (3, 2, 9, 130, 32),
]
ATTN_SMALL = [(2, 2, 5, 7, 8), (2, 1, 17, 20, 16)]


def _mask(b, lk, seed, empty_batch=True):
    m = torch.rand(b, lk, generator=_gen(seed)) > 0.35
    m[:, 0] = True
    if empty_batch:
        m[-1] = False        # a batch element with every key padded
    return m


def _attn_inputs(case, dtype, seed):
    b, h, lq, lk, d = case
    g = _gen(seed)
    return (randn(b, h, lq, d, dtype=dtype, generator=g), randn(b, h, lk, d, dtype=dtype, generator=g),
            randn(b, h, lk, d, dtype=dtype, generator=g))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_attention_forward(backend, poison, dtype, masked):
    require_op(backend, "attention_fwd")
    for case in (ATTN_SMALL if small(backend) else ATTN_CASES):
        q, k, v = _attn_inputs(case, dtype, seed=11)
        mask = _mask(case[0], case[3], seed=12) if masked else None
        out = ops.attention(*_dev(q, k, v, mask))
        assert out.dtype == dtype and out.shape == q.shape
        ref = reference.attention(q.double(), k.double(), v.double(), mask)
        same = reference.attention(q, k, v, mask)
        assert_close_to_reference(out.cpu(), ref, same, what=f"attention {case}")
        if masked:
            assert (out[-1] == 0).all(), "fully masked rows must output zeros"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_backward(backend, dtype):
    require_op(backend, "attention_bwd")
    case = (2, 2, 5, 7, 8) if small(backend) else (2, 2, 24, 77, 40)
    q, k, v = _attn_inputs(case, dtype, seed=21)
    mask = _mask(case[0], case[3], seed=22)
    leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    out = ops.attention(*leaves, key_padding_mask=mask.to(DEVICE), scale=0.3)
    go = randn(*out.shape, dtype=dtype, generator=_gen(23)).to(DEVICE)
    grads = torch.autograd.grad(out, leaves, go)
    r_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    r_grads = torch.autograd.grad(reference.attention(*r_leaves, mask, 0.3), r_leaves, go.cpu().double())
    lp_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    lp_grads = torch.autograd.grad(reference.attention(*lp_leaves, mask, 0.3), lp_leaves, go.cpu())
    for name, g, r, t in zip("qkv", grads, r_grads, lp_grads):
        assert torch.isfinite(g).all()
        assert_close_to_reference(g.cpu(), r, t, what=f"grad {name}")
        assert (g[-1] == 0).all(), f"grad {name} of a fully masked batch must be zero"


def test_attention_gradcheck(backend):
    require_op(backend, "attention_bwd")
    if backend in ("triton", "cuda") and DEVICE.type == "cpu":
        pytest.skip("float64 gradcheck runs on backends torch and cpu")
    q, k, v = (t.to(DEVICE).requires_grad_() for t in _attn_inputs((2, 2, 3, 5, 4), torch.float64, 31))
    mask = _mask(2, 5, seed=32).to(DEVICE)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.attention(a, b, c, mask), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_fully_masked_row_lse_convention(backend, dtype):
    """The log-sum-exp saved for the backward: log of the sum over the attended keys, and
    imagen_fast.core.MASKED_ROW_LSE (-inf) for a query with no key at all, as the JAX
    kernel (tests/jax_path/test_jax_ops.py)."""
    require_op(backend, "attention_fwd")
    q, k, v = _attn_inputs((2, 2, 5, 7, 8), dtype, seed=41)
    mask = _mask(2, 7, seed=42)
    fwd = dispatch.resolve("attention_fwd", DEVICE, *_dev(q, k, v, mask))
    out, lse = fwd(*_dev(q, k, v, mask), 0.4)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 5)
    assert (lse[-1].cpu() == MASKED_ROW_LSE).all() and (out[-1] == 0).all()
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * 0.4
    expected = torch.logsumexp(scores.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
    torch.testing.assert_close(lse[0].cpu().double(), expected[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- dynamic thresholding
THRESH_SHAPES = [(3, 3, 8, 8), (1, 3, 7, 9), (5, 1, 13, 11), (2, 4, 33)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("percentile", [0.0, 0.5, 0.995, 1.0])
def test_dynamic_threshold(backend, poison, dtype, percentile):
    shapes = THRESH_SHAPES[:2] if small(backend) else THRESH_SHAPES
    for i, shape in enumerate(shapes):
        # Mixed scales: some samples need s > 1, others are clamped to min_value.
        x = randn(*shape, dtype=torch.float64, generator=_gen(40 + i))
        x = x * torch.tensor([3.0, 0.2, 1.5, 4.0, 0.7][: shape[0]], dtype=torch.float64).reshape(
            -1, *([1] * (len(shape) - 1)))
        x = x.to(dtype)
        y = ops.dynamic_threshold(x.to(DEVICE), percentile)
        assert y.dtype == dtype and y.shape == x.shape
        ref = reference.dynamic_threshold(x.double(), percentile)
        # Same-dtype error: the reference's maths rounded to the dtype.
        assert_close_to_reference(y.cpu(), ref, ref.to(dtype), what=f"threshold {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dynamic_threshold_max_value(backend, dtype):
    """s = clamp(quantile, min_value, max_value) in torch.clamp's order (max wins), as
    diffusers' schedulers clamp it: samples above, inside and below the bounds."""
    x = randn(4, 3, 5, 7, dtype=torch.float64, generator=_gen(45))
    x = (x * torch.tensor([3.0, 0.2, 1.3, 6.0], dtype=torch.float64).reshape(-1, 1, 1, 1)).to(dtype)
    for max_value in (1.5, 0.8):
        y = ops.dynamic_threshold(x.to(DEVICE), 0.95, 1.0, max_value)
        flat = x.double().reshape(4, -1)
        s = torch.quantile(flat.abs(), 0.95, dim=1).clamp(min=1.0, max=max_value)[:, None]
        expected = (torch.clamp(flat, -s, s) / s).reshape(x.shape)
        assert_close_to_reference(y.cpu(), expected, expected.to(dtype), what=f"max {max_value}")


def test_dynamic_threshold_ties_and_layout(backend):
    """Many equal magnitudes (ties across the selection boundary) and channels_last."""
    x = torch.randint(-6, 7, (4, 3, 6, 5), generator=_gen(50)).float() / 2
    x = x.to(DEVICE).contiguous(memory_format=torch.channels_last)
    y = ops.dynamic_threshold(x, 0.9, min_value=1.0)
    assert ops.is_channels_last(y)
    ref = reference.dynamic_threshold(x.cpu().double(), 0.9, 1.0)
    assert_close_to_reference(y.cpu(), ref, floor=1e-6)


def test_dynamic_threshold_matches_torch_quantile(backend):
    shape = (2, 3, 5, 7) if small(backend) else (4, 3, 32, 32)
    x = randn(*shape, generator=_gen(51), scale=2.5)
    s = torch.quantile(x.abs().reshape(shape[0], -1), 0.995, dim=1).clamp(min=1.0)
    expected = torch.maximum(torch.minimum(x, s.reshape(-1, 1, 1, 1)), -s.reshape(-1, 1, 1, 1))
    expected = expected / s.reshape(-1, 1, 1, 1)
    y = ops.dynamic_threshold(x.to(DEVICE), 0.995)
    assert_close_to_reference(y.cpu(), expected.double(), floor=1e-6)


def test_dynamic_threshold_above_quantile_limit(backend):
    """8x3x1024x1024 has more than 2^24 elements in total: torch.quantile refuses it."""
    if small(backend):
        pytest.skip("too large for Triton's interpreter")
    n = 2
    x = randn(n, 3, 1024, 1024, generator=_gen(52), scale=2.0)
    y = ops.dynamic_threshold(x.to(DEVICE), 0.995)
    flat = x.reshape(n, -1).abs().double()
    s = reference.quantile_linear(flat, 0.995).clamp(min=1.0).reshape(-1, 1, 1, 1)
    assert_close_to_reference(y.cpu(), (x.double().clamp(-s, s) / s), floor=1e-6)


# --------------------------------------------------------------------- sampler step
@pytest.mark.parametrize("threshold", ["dynamic", "static", "none"])
@pytest.mark.parametrize("sampler,eta,prediction", [
    ("ddpm", 0.0, "eps"), ("ddim", 0.0, "eps"), ("ddim", 0.5, "v"),
])
@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampler_step(backend, poison, threshold, sampler, eta, prediction, guided, dtype):
    shape = (3, 3, 5, 7) if small(backend) else (3, 3, 16, 12)
    g = _gen(60)
    z, cond, uncond, noise = (randn(*shape, dtype=dtype, generator=g) for _ in range(4))
    alpha_t = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    sigma_t = (1 - alpha_t ** 2).sqrt()
    alpha_s = torch.tensor([0.5, 0.8, 1.0], dtype=torch.float64)
    sigma_s = (1 - alpha_s ** 2).sqrt()            # last sample: the final step to s = 0
    kw = dict(guidance_scale=5.0, alpha_t=alpha_t, sigma_t=sigma_t, alpha_s=alpha_s,
              sigma_s=sigma_s, sampler=sampler, eta=eta, threshold=threshold,
              percentile=0.95, prediction=prediction)
    out = ops.sampler_step(*_dev(z, cond, uncond if guided else None), noise=noise.to(DEVICE), **kw)
    coefs = ops.step_coefficients(alpha_t, sigma_t, alpha_s, sigma_s, sampler=sampler, eta=eta,
                                  prediction=prediction)
    d = lambda t: t.double()  # noqa: E731
    ref = reference.sampler_step(d(z), d(cond), d(uncond) if guided else None, 5.0, coefs,
                                 d(noise), threshold, 0.95, 1.0)
    same = reference.sampler_step(z, cond, uncond if guided else None, 5.0, coefs, noise,
                                  threshold, 0.95, 1.0)
    assert out.dtype == dtype
    assert_close_to_reference(out.cpu(), ref, same, what="z_s")


def test_sampler_step_coefficients_closed_form():
    """DDPM posterior mean/variance against the discrete-time formulas."""
    abar_t, abar_s = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.55], dtype=torch.float64)
    beta = 1 - abar_t / abar_s                     # one discrete step s -> t
    c = ops.step_coefficients(abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(), (1 - abar_s).sqrt())
    a, b, c_x0, c_z, c_noise = c[0]
    # Ho et al. (2020), eq. 7.
    assert math.isclose(c_x0, (abar_s.sqrt() * beta / (1 - abar_t)).item(), rel_tol=1e-12)
    assert math.isclose(c_z, ((1 - beta).sqrt() * (1 - abar_s) / (1 - abar_t)).item(), rel_tol=1e-12)
    assert math.isclose(c_noise ** 2, ((1 - abar_s) / (1 - abar_t) * beta).item(), rel_tol=1e-12)
    assert math.isclose(a, 1 / abar_t.sqrt().item(), rel_tol=1e-12)
    assert math.isclose(b, -((1 - abar_t) / abar_t).sqrt().item(), rel_tol=1e-12)
    # DDIM with eta = 1 is the same step; eta = 0 has no noise.
    ddim1 = ops.step_coefficients(abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(),
                                  (1 - abar_s).sqrt(), sampler="ddim", eta=1.0)
    torch.testing.assert_close(ddim1, c, rtol=1e-12, atol=1e-12)
    ddim0 = ops.step_coefficients(abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(),
                                  (1 - abar_s).sqrt(), sampler="ddim", eta=0.0)
    assert ddim0[0, 4] == 0


def test_sampler_step_final_step_returns_x0(backend):
    z, eps = randn(2, 3, 4, 4, generator=_gen(70)), randn(2, 3, 4, 4, generator=_gen(71))
    out = ops.sampler_step(*_dev(z, eps), alpha_t=0.8, sigma_t=0.6, alpha_s=1.0, sigma_s=0.0,
                           threshold="none")
    assert_close_to_reference(out.cpu(), (z.double() - 0.6 * eps.double()) / 0.8, floor=1e-5)


# ---------------------------------------------- thresholding and the step: any strides
def _in_layout(x, layout, g):
    """A tensor equal to x (on DEVICE) stored in the given layout. "expanded" needs x's
    samples to be equal (see _layout_inputs); "size1" needs a size-1 dim and gives it an
    unusual stride (dense and contiguous all the same, but strides unlike x's)."""
    x = x.to(DEVICE)
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":                  # every other element of a wider buffer
        wide = torch.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "transposed":               # W before H in memory
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "expanded":                 # stride 0 over the batch
        return x[:1].expand(x.shape)
    if layout == "size1":
        strides = list(x.contiguous().stride())
        strides[list(x.shape).index(1)] = 1
        return torch.as_strided(x.contiguous().clone(), x.shape, strides)
    raise AssertionError(layout)


def _layout_inputs(shape, layouts, dtype, g):
    """Fresh inputs, one per layout name: samples equal where the layout is "expanded"."""
    out = []
    for layout in layouts:
        if layout is None:
            out.append((None, None))
            continue
        x = randn(*shape, dtype=dtype, generator=g, scale=1.5)
        if layout == "expanded":
            x = x[:1].expand(shape).clone()
        out.append((x, _in_layout(x, layout, g)))
    return out


# (z_t, pred_cond, pred_uncond, noise): every layout in every role at least once,
# mismatched between the arguments; "size1" runs at a shape with a size-1 dim.
STEP_LAYOUTS = [
    ("contiguous", "channels_last", "strided", "expanded"),
    ("channels_last", "contiguous", "channels_last", "transposed"),
    ("channels_last", "expanded", "strided", None),
    ("strided", "channels_last", None, "contiguous"),
    ("expanded", "transposed", "channels_last", "strided"),
    ("transposed", "strided", "expanded", "channels_last"),
    ("contiguous", "size1", "size1", "size1"),
    ("size1", "contiguous", "channels_last", "size1"),
]


@pytest.mark.parametrize("threshold", ["dynamic", "static"])
@pytest.mark.parametrize("layouts", STEP_LAYOUTS, ids=lambda ls: "-".join(map(str, ls)))
def test_sampler_step_any_strides(backend, poison, layouts, threshold):
    """Inputs whose strides differ from z_t's and from each other give the same step as
    contiguous ones (the kernels index every tensor by z_t's flat offsets)."""
    size1 = "size1" in layouts
    shape = (3, 3, 1, 5) if size1 else ((3, 3, 5, 7) if small(backend) else (3, 4, 9, 11))
    g = _gen(80 + STEP_LAYOUTS.index(layouts))
    (z, zd), (c, cd), (u, ud), (nz, nd) = _layout_inputs(shape, layouts, torch.float32, g)
    alpha_t = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    alpha_s = torch.tensor([0.5, 0.8, 0.95], dtype=torch.float64)
    kw = dict(guidance_scale=4.0, alpha_t=alpha_t, sigma_t=(1 - alpha_t ** 2).sqrt(),
              alpha_s=alpha_s, sigma_s=(1 - alpha_s ** 2).sqrt(), sampler="ddim", eta=0.5,
              threshold=threshold, percentile=0.9)
    if nd is None:
        nz = randn(*shape, generator=g)
        nd = nz.to(DEVICE)
    out = ops.sampler_step(zd, cd, ud, noise=nd, **kw)
    assert out.shape == shape and out.dtype == torch.float32
    coefs = ops.step_coefficients(alpha_t, kw["sigma_t"], alpha_s, kw["sigma_s"], sampler="ddim",
                                  eta=0.5)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = reference.sampler_step(d(z), d(c), d(u), 4.0, coefs, d(nz), threshold, 0.9, 1.0)
    same = reference.sampler_step(z, c, u, 4.0, coefs, nz, threshold, 0.9, 1.0)
    assert_close_to_reference(out.cpu(), ref, same, what=f"z_s {layouts}")


@pytest.mark.parametrize("layout", ["channels_last", "strided", "transposed", "expanded",
                                    "size1"])
def test_dynamic_threshold_any_strides(backend, poison, layout):
    shape = (3, 3, 1, 5) if layout == "size1" else (3, 3, 6, 7)
    g = _gen(90)
    ((x, xd),) = _layout_inputs(shape, [layout], torch.float32, g)
    y = ops.dynamic_threshold(xd, 0.9)
    assert y.shape == shape
    if layout == "channels_last":
        assert ops.is_channels_last(y), "layout not kept"
    ref = reference.dynamic_threshold(x.double(), 0.9)
    assert_close_to_reference(y.cpu(), ref, ref.float(), what=f"threshold {layout}")
