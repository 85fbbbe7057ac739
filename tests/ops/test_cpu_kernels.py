"""What is special about the C++ CPU kernels (csrc/cpu), beyond the op contract of test_ops.py.

Both memory layouts, every dtype, every FiLM/activation combination, the split
("team") reduction paths taken when there are fewer tiles than threads, statistics of
badly centred data, percentile edge cases and exactness of the radix selection
(also above torch.quantile's 2^24-element limit), the fused sampler step in every
mode, attention's fully masked batches, poisoned outputs, and the C++ argument
checks. Everything is compared with imagen_fast.ops.reference in float64, with the
tolerance rule of tests/support/numerics.py (relative to PyTorch's own same-dtype error).
"""
import itertools
import math
import os
import platform
import subprocess
import sys

import pytest
import torch

from support.device import CPU_ISAS, cpu_isa
from imagen_fast._compiled import load_extension
from imagen_fast.ops import dispatch, reference
from imagen_fast.ops.api import step_coefficients
from support.numerics import assert_close_to_reference, randn

_status = dispatch.available_backends()["cpu"]
if _status != "available":
    if os.environ.get("IMAGEN_FAST_REQUIRE_EXTENSION") == "1":
        raise RuntimeError(f"backend cpu unavailable: {_status}")
    pytest.skip(f"backend cpu unavailable: {_status}", allow_module_level=True)

from imagen_fast.kernels import cpu as cb  # noqa: E402

_C = load_extension()
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


@pytest.fixture(autouse=True, params=CPU_ISAS)
def isa(request):
    """Every test of this file runs on each variant of the kernels (avx512, portable)."""
    with cpu_isa(request.param) as name:
        yield name


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layout(x, channels_last):
    if not channels_last:
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)


@pytest.fixture
def threads(request):
    """Run with torch.get_num_threads() = request.param (the kernels use torch's count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty* hands out NaN-filled memory: unwritten outputs show up as NaN."""
    for name in ("empty", "empty_like", "empty_strided"):
        real = getattr(torch, name)

        def fill(*a, _real=real, **k):
            t = _real(*a, **k)
            if t.is_floating_point():
                t.fill_(float("nan"))
            return t
        monkeypatch.setattr(torch, name, fill)
    yield


def _d64(t):
    return None if t is None else t.double()


# ----------------------------------------------------------------- group_norm_silu
def _gn_case(shape, dtype, flags, seed, offset=0.5, spread=2.0):
    """x and the optional (weight, bias, scale, shift) picked by flags, params float32/64."""
    g = _gen(seed)
    n, c = shape[:2]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = (randn(*shape, dtype=torch.float64, generator=g) * spread + offset).to(dtype)
    params = [randn(*sz, generator=g, scale=sc).to(pdt) if on else None for on, sz, sc in
              zip(flags, [(c,), (c,), (n, c), (n, c)], [1.0, 1.0, 0.5, 0.5])]
    return x, params


def _check_norm_grads(names, grads, r64, rlp, inputs, x, act):
    """A norm's gradients against the float64 reference (r64) with the low-precision
    reference's error (rlp) as the yardstick; absent inputs get None; grad_x keeps x's
    layout; parameter gradients (sums over the map) get a floor for their size."""
    for name, g, r, t, p in zip(names, grads, r64, rlp, inputs):
        if p is None:
            assert g is None
            continue
        assert g.shape == p.shape and g.dtype == p.dtype
        if name == "x":
            assert g.stride() == x.stride(), "grad_x must keep x's layout"
        floor = None if name == "x" else 1e-4 * math.sqrt(x.numel()) * r.abs().max().item() + 1e-12
        assert_close_to_reference(g, r, t, what=f"grad {name} {tuple(x.shape)} {act}", floor=floor)


def _gn_reference_grads(x, params, groups, act, gy, dtype):
    """(grads in float64, grads of the reference run in the low precision dtype)."""
    out = []
    for dt in (torch.float64, dtype):
        leaves = [None if t is None else t.to(dt).requires_grad_() for t in [x] + params]
        y = reference.group_norm_silu(leaves[0], groups, leaves[1], leaves[2], 1e-5, leaves[3],
                                      leaves[4], act)
        live = [t for t in leaves if t is not None]
        gr = iter(torch.autograd.grad(y, live, gy.to(dt)))
        out.append([None if t is None else next(gr) for t in leaves])
    return out


def _check_gn(x, params, groups, act, *, seed=0, backward=True):
    """Forward and backward of the cpu backend against the float64 reference."""
    dtype = x.dtype
    y, mean, rstd = cb.group_norm_silu_fwd(x, groups, *params[:2], 1e-5, *params[2:], act)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    assert mean.shape == (x.shape[0], groups)
    ref = reference.group_norm_silu(x.double(), groups, *map(_d64, params[:2]), 1e-5,
                                    *map(_d64, params[2:]), act)
    lp = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    same = reference.group_norm_silu(x, groups, *map(lp, params[:2]), 1e-5, *map(lp, params[2:]), act)
    assert_close_to_reference(y, ref, same, what=f"y {tuple(x.shape)} {act}")
    m64, r64 = reference.group_norm_stats(x.double(), groups, 1e-5)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-5, atol=1e-6 * (1 + m64.abs().max().item()))
    torch.testing.assert_close(rstd.double(), r64, rtol=1e-5, atol=0)
    if not backward:
        return
    gy = _layout(randn(*x.shape, generator=_gen(seed + 1)).to(dtype), not x.is_contiguous())
    needs = (True,) + tuple(p is not None for p in params)
    grads = cb.group_norm_silu_bwd(gy, x, mean, rstd, groups, *params, act, needs)
    r64, rlp = _gn_reference_grads(x, params, groups, act, gy, dtype)
    _check_norm_grads(["x", "weight", "bias", "scale", "shift"], grads, r64, rlp, [x] + params, x, act)


FILM_FLAGS = list(itertools.product([False, True], repeat=4))   # weight, bias, scale, shift


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu", "none"])
def test_group_norm_every_film_variant(poisoned, dtype, channels_last, activation):
    for i, flags in enumerate(FILM_FLAGS):
        x, params = _gn_case((2, 12, 5, 7), dtype, flags, seed=i)
        _check_gn(_layout(x, channels_last), params, 3, activation, seed=i)


GN_ODD = [  # shape, groups: odd channel counts hit the lcm(C, 16) period and masked tails
    ((3, 3, 7, 9), 1),        # RGB: period of 48 positions over 16 rows
    ((2, 96, 7, 9), 32),      # the contract's C=96
    ((1, 200, 3, 5), 8),      # period 400
    ((2, 1000, 3, 2), 8),     # lcm too long: period C with a masked tail per row
    ((2, 4, 70, 70), 2),      # several 4096-element chunks per group, with a tail
    ((2, 8, 1, 1), 4),        # no spatial extent
    ((3, 12, 11), 3),         # 1-D spatial
    ((2, 8, 3, 4, 5), 2),     # 3-D spatial (channels_last_3d)
    ((2, 64, 4, 4), 32),      # channels of one to three vectors: the short-run paths
    ((2, 48, 4, 8), 8),
    ((2, 24, 6, 8), 4),
    ((1, 16, 2, 2), 4),       # float64's one-lane vectors
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_odd_shapes(poisoned, dtype, channels_last):
    for i, (shape, groups) in enumerate(GN_ODD):
        if channels_last and len(shape) not in (4, 5):
            continue
        x, params = _gn_case(shape, dtype, (True, True, True, True), seed=100 + i)
        _check_gn(_layout(x, channels_last), params, groups, "silu", seed=100 + i)


SPLIT_CASES = [  # N * G < threads, or not a multiple of it: the team path
    ((1, 8, 64, 64), 1),
    ((1, 64, 32, 32), 2),
    ((3, 16, 32, 32), 1),
    ((1, 96, 24, 20), 32),
]


@pytest.mark.parametrize("threads", [2, 3], indirect=True)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_split_reduction(poisoned, threads, channels_last, dtype):
    for i, (shape, groups) in enumerate(SPLIT_CASES):
        x, params = _gn_case(shape, dtype, (True, True, True, True), seed=200 + i)
        x = _layout(x, channels_last)
        _check_gn(x, params, groups, "silu", seed=200 + i)
        # The team result matches the single-thread one up to summation order.
        y_team, m_team, r_team = cb.group_norm_silu_fwd(x, groups, *params[:2], 1e-5, *params[2:], "gelu")
        torch.set_num_threads(1)
        y_one, m_one, r_one = cb.group_norm_silu_fwd(x, groups, *params[:2], 1e-5, *params[2:], "gelu")
        torch.set_num_threads(threads)
        torch.testing.assert_close(m_team, m_one, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r_team, r_one, rtol=1e-5, atol=0)
        torch.testing.assert_close(y_team.float(), y_one.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-5)


STREAMED = [  # float32 channels-last outputs of 16 MiB and more go out by streaming stores
    ((1, 256, 128, 128), 32),    # one sample split over the threads
    ((64, 64, 32, 32), 32),      # whole samples per thread, the next one prefetched
    ((1, 40, 320, 330), 8),      # a period not a multiple of the vector: some blocks unaligned
]


@pytest.mark.parametrize("threads", [2, 3], indirect=True)
def test_group_norm_streamed_output(poisoned, threads):
    for i, (shape, groups) in enumerate(STREAMED):
        x, params = _gn_case(shape, torch.float32, (True, True, True, True), seed=230 + i)
        assert x.numel() * 4 >= 16 << 20
        _check_gn(_layout(x, True), params, groups, "silu", backward=False)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_statistics_far_from_zero(channels_last):
    """Mean 1e4 and std 1 in float32: E[x^2] - mean^2 would lose every digit of the variance."""
    for shape, groups in [((2, 32, 40, 40), 8), ((1, 64, 128, 128), 32)]:
        x = _layout(randn(*shape, generator=_gen(7)) + 1e4, channels_last)
        _, mean, rstd = cb.group_norm_silu_fwd(x, groups, None, None, 1e-5, None, None, "none")
        m64, r64 = reference.group_norm_stats(x.double(), groups, 1e-5)
        assert ((rstd.double() - r64).abs() / r64).max() < 1e-5
        assert ((mean.double() - m64).abs()).max() < 1e-6 * 1e4


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_norm_statistics_with_outliers_first(channels_last, dtype):
    """The one-pass statistics shift by an early estimate of the mean and verify it; outliers
    at the start of each group (and of later chunks) must send them to the two-pass path."""
    x = randn(2, 8, 96, 96, generator=_gen(8)).to(dtype)
    x[:, :, :2, :] = 1e4          # first rows: far from the group means
    x[:, :, 60:62, :] = -3e3      # and again in a later chunk
    x = _layout(x, channels_last)
    _, mean, rstd = cb.group_norm_silu_fwd(x, 2, None, None, 1e-5, None, None, "none")
    m64, r64 = reference.group_norm_stats(x.double(), 2, 1e-5)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert ((rstd.double() - r64).abs() / r64).max() < tol
    assert ((mean.double() - m64).abs() / (1 + m64.abs())).max() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_large_preactivations(dtype):
    """Activations far in their tails (|h| up to ~1e3) stay finite and accurate."""
    x, (w, b, s, sh) = _gn_case((2, 16, 9, 9), dtype, (True, True, True, True), seed=9)
    w = w * 200
    for act in ("silu", "gelu"):
        _check_gn(x, [w, b, s, sh], 4, act, backward=act == "silu")


def test_group_norm_constant_groups():
    """Zero variance: rstd = 1/sqrt(eps), output = act(bias-ish), no NaN."""
    x = torch.full((2, 8, 6, 6), 3.25)
    y, mean, rstd = cb.group_norm_silu_fwd(x, 4, None, None, 1e-5, None, None, "silu")
    assert torch.isfinite(y).all() and (mean == 3.25).all()
    torch.testing.assert_close(rstd, torch.full_like(rstd, 1 / math.sqrt(1e-5)))
    assert (y == 0).all()


# ------------------------------------------------------------ dynamic thresholding
def _quantile_abs(x, p, threads=0, radix_only=False):
    """The selection dynamic_threshold uses (sampled estimate, radix fallback) or the radix path alone."""
    n = x.shape[0]
    return torch.tensor(_C.quantile_abs(x.data_ptr(), n, x.numel() // n, CODES[x.dtype], p, threads,
                                        radix_only), dtype=torch.float64)


def _expected_threshold(x, p, min_value):
    """reference.dynamic_threshold in x's compute dtype (float32 for 16-bit inputs)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return reference.dynamic_threshold(x.to(cdt), p, min_value).to(x.dtype)


PERCENTILE_CASES = {
    "gaussian": lambda g: randn(4, 3, 20, 21, generator=g, scale=2.0),
    "gaussian_big": lambda g: randn(2, 3, 64, 64, generator=g, scale=2.0),   # > 8192: estimate path
    "ties": lambda g: torch.randint(-4, 5, (3, 5000), generator=g).float(),
    "ties_big": lambda g: torch.randint(-4, 5, (2, 20000), generator=g).float(),
    "float64_big": lambda g: randn(2, 9000, generator=g, scale=2.0).double(),
    "all_equal": lambda g: torch.full((2, 3000), -2.5),
    "one_per_sample": lambda g: randn(5, 1, generator=g, scale=3.0),
    "two_per_sample": lambda g: randn(5, 2, generator=g, scale=3.0),
    "huge": lambda g: randn(3, 777, generator=g) * 1e30,
    "below_min": lambda g: randn(3, 500, generator=g) * 1e-3,
    "tiny_and_zero": lambda g: torch.cat([torch.zeros(2, 100), randn(2, 100, generator=g) * 1e-42], 1),
    "signed_zeros": lambda g: torch.tensor([[0.0, -0.0, 0.0, 1.5, -0.0]]),
}


@pytest.mark.parametrize("case", sorted(PERCENTILE_CASES))
@pytest.mark.parametrize("p", [0.0, 1e-9, 0.3, 0.5, 0.995, 1.0 - 1e-9, 1.0])
def test_percentile_selection_is_exact(case, p):
    x = PERCENTILE_CASES[case](_gen(sum(map(ord, case))))
    flat = x.reshape(x.shape[0], -1)
    want = reference.quantile_linear(flat.abs(), p).double()
    for radix_only in (False, True):
        got = _quantile_abs(x, p, radix_only=radix_only)
        assert torch.equal(got, want), f"{case} p={p} radix_only={radix_only}: {got.tolist()} != {want.tolist()}"
    y = cb.dynamic_threshold(x, p, 1.0)
    assert torch.equal(y, _expected_threshold(x, p, 1.0))


def _fool_the_sample(x, value):
    """Put `value` at the positions the kernels sample for their estimate (1024 strided
    elements per sample), so the estimated range misses the true order statistics."""
    n, L = x.shape[0], x[0].numel()
    idx = (2 * torch.arange(1024) + 1) * L // 2048
    flat = x.reshape(n, L).clone()
    flat[:, idx] = value
    return flat.reshape(x.shape)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("value,p", [(0.5, 0.5), (1e-3, 0.995), (40.0, 0.3)])
def test_percentile_estimate_misses_fall_back(threads, value, p):
    """A missed or overfull estimate falls back to the radix selection: still exact."""
    x = _fool_the_sample(randn(2, 3, 48, 48, generator=_gen(12), scale=3.0), value)
    want = reference.quantile_linear(x.reshape(2, -1).abs(), p).double()
    assert torch.equal(_quantile_abs(x, p), want)
    assert torch.equal(cb.dynamic_threshold(x, p, 1.0), _expected_threshold(x, p, 1.0))
    # sampler_step with x0 = z (a = 1, b = 0) selects on the same values
    coefs = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]] * 2, dtype=torch.float64)
    out = cb.sampler_step(x, torch.randn_like(x), None, 1.0, coefs, None, "dynamic", p, 1.0)
    assert torch.equal(out, _expected_threshold(x, p, 1.0))


def test_percentile_all_below_min_value():
    x = randn(3, 400, generator=_gen(3)) * 1e-2
    y = cb.dynamic_threshold(x, 0.995, 0.5)
    assert torch.equal(y, x / 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_dynamic_threshold_dtypes_and_layouts(poisoned, dtype, channels_last):
    x = _layout((randn(3, 3, 17, 23, generator=_gen(4)) * 2).to(dtype), channels_last)
    for p in (0.0, 0.9, 0.995, 1.0):
        y = cb.dynamic_threshold(x, p, 1.0)
        assert y.stride() == x.stride()
        # The same maths as the reference, rounded once: identical bits.
        assert torch.equal(y, _expected_threshold(x, p, 1.0))
        ref = reference.dynamic_threshold(x.double(), p, 1.0)
        assert_close_to_reference(y, ref, ref.to(dtype))


@pytest.mark.parametrize("threads", [2, 3], indirect=True)
def test_dynamic_threshold_batch_one_splits_the_sample(threads):
    """Batch 1 (and batch 3 on 2 threads) use the team path: selection merged across threads."""
    for shape in [(1, 3, 160, 160), (3, 3, 64, 64)]:
        for scale in (0.3, 3.0):
            x = randn(*shape, generator=_gen(5), scale=scale)
            # many ties across thread boundaries as well
            x[..., ::7] = 1.75
            for p in (0.0, 0.5, 0.995, 1.0):
                got = _quantile_abs(x, p, threads)
                want = reference.quantile_linear(x.reshape(shape[0], -1).abs(), p).double()
                assert torch.equal(got, want)
                assert torch.equal(cb.dynamic_threshold(x, p, 1.0), _expected_threshold(x, p, 1.0))


def test_dynamic_threshold_8x3x1024x1024():
    """25M elements (torch.quantile stops at 2^24): exact against the sorting reference."""
    x = randn(8, 3, 1024, 1024, generator=_gen(6), scale=2.0)
    got = _quantile_abs(x, 0.995)
    want = reference.quantile_linear(x.reshape(8, -1).abs(), 0.995).double()
    assert torch.equal(got, want)
    y = cb.dynamic_threshold(x, 0.995, 1.0)
    s = want.float().clamp(min=1.0).reshape(-1, 1, 1, 1)
    assert torch.equal(y, torch.maximum(torch.minimum(x, s), -s) / s)
    x1 = x[:1].clone()   # batch 1: the team path on the same data
    assert torch.equal(cb.dynamic_threshold(x1, 0.995, 1.0), y[:1])


# --------------------------------------------------------------------- sampler step
def _step_inputs(shape, dtype, seed):
    g = _gen(seed)
    z, cond, uncond, noise = (randn(*shape, generator=g).to(dtype) for _ in range(4))
    n = shape[0]
    alpha_t = torch.linspace(0.3, 0.9, n, dtype=torch.float64)
    alpha_s = torch.linspace(0.5, 1.0, n, dtype=torch.float64)
    coefs = step_coefficients(alpha_t, (1 - alpha_t ** 2).sqrt(), alpha_s, (1 - alpha_s ** 2).sqrt())
    return z, cond, uncond, noise, coefs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", ["dynamic", "static", "none"])
def test_sampler_step_every_mode(poisoned, dtype, threshold):
    for channels_last, guided, noisy in itertools.product([False, True], repeat=3):
        z, cond, uncond, noise, coefs = _step_inputs((3, 3, 9, 11), dtype, seed=8)
        z, cond, uncond, noise = (_layout(t, channels_last) for t in (z, cond, uncond, noise))
        u, nz = (uncond if guided else None), (noise if noisy else None)
        out = cb.sampler_step(z, cond, u, 4.0, coefs, nz, threshold, 0.95, 1.0)
        assert out.dtype == dtype and out.stride() == z.stride()
        ref = reference.sampler_step(z.double(), cond.double(), _d64(u), 4.0, coefs, _d64(nz),
                                     threshold, 0.95, 1.0)
        same = reference.sampler_step(z, cond, u, 4.0, coefs, nz, threshold, 0.95, 1.0)
        assert_close_to_reference(out, ref, same, what=f"z_s {threshold} guided={guided} noise={noisy}")


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampler_step_threads(threads, dtype):
    """Whole-sample and split paths (batch 1 and 3), x0 in place (float32) or in scratch (bf16)."""
    for shape in [(1, 3, 96, 96), (3, 3, 64, 64)]:
        z, cond, uncond, noise, coefs = _step_inputs(shape, dtype, seed=9)
        out = cb.sampler_step(z, cond, uncond, 7.5, coefs, noise, "dynamic", 0.995, 1.0)
        ref = reference.sampler_step(z.double(), cond.double(), uncond.double(), 7.5, coefs,
                                     noise.double(), "dynamic", 0.995, 1.0)
        same = reference.sampler_step(z, cond, uncond, 7.5, coefs, noise, "dynamic", 0.995, 1.0)
        assert_close_to_reference(out, ref, same, what=f"z_s {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampler_step_coefficient_layouts(dtype):
    """One row for every sample (a (5,) row expanded to (N, 5): the kernel reads it in place,
    stride 0), a float32 table, a non-contiguous (N, 5) view: all as the per-sample table."""
    z, cond, uncond, noise, coefs = _step_inputs((3, 3, 9, 11), dtype, seed=12)
    row = coefs[1]
    every = row.expand(3, 5)
    table = torch.stack([row] * 3)
    want = reference.sampler_step(z.double(), cond.double(), uncond.double(), 4.0, table, noise.double(),
                                  "dynamic", 0.95, 1.0)
    same = reference.sampler_step(z, cond, uncond, 4.0, table, noise, "dynamic", 0.95, 1.0)
    padded = torch.zeros(3, 7, dtype=torch.float64)
    padded[:, 1:6] = table
    for c in (every, table, table.float(), padded[:, 1:6], row.float().expand(3, 5)):
        out = cb.sampler_step(z, cond, uncond, 4.0, c, noise, "dynamic", 0.95, 1.0)
        assert_close_to_reference(out, want, same, what=f"coefs strides {c.stride()} {c.dtype}")
    per_sample = cb.sampler_step(z, cond, uncond, 4.0, coefs, noise, "dynamic", 0.95, 1.0)
    assert not torch.equal(per_sample[0], cb.sampler_step(z, cond, uncond, 4.0, every, noise, "dynamic",
                                                          0.95, 1.0)[0])
    with pytest.raises(ValueError, match="coefs must have shape"):
        cb.sampler_step(z, cond, uncond, 4.0, coefs[:2], noise, "dynamic", 0.95, 1.0)


# ----------------------------------------------------------------------- attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_attention_fully_masked_batches(poisoned, dtype):
    b, h, lq, lk, d = 3, 2, 6, 9, 16
    g = _gen(10)
    q, k, v = (randn(b, h, n, d, generator=g).to(dtype) for n in (lq, lk, lk))
    mask = torch.rand(b, lk, generator=g) > 0.4
    mask[0, 0] = True
    mask[1] = False                       # nothing to attend to
    mask[2] = True
    out, lse = cb.attention_fwd(q, k, v, mask, 0.25)
    assert lse.dtype == torch.float32 and lse.shape == (b, h, lq)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[[0, 2]]).all()
    ref = reference.attention(q.double(), k.double(), v.double(), mask, 0.25)
    same = reference.attention(q, k, v, mask, 0.25)
    assert_close_to_reference(out, ref, same)
    go = randn(*out.shape, generator=g).to(dtype)
    grads = cb.attention_bwd(go, q, k, v, mask, out, lse, 0.25)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    rgrads = torch.autograd.grad(reference.attention(*leaves, mask, 0.25), leaves, go.double())
    lp = [t.clone().requires_grad_() for t in (q, k, v)]
    lgrads = torch.autograd.grad(reference.attention(*lp, mask, 0.25), lp, go)
    for name, gr, r, t in zip("qkv", grads, rgrads, lgrads):
        assert gr.dtype == dtype and torch.isfinite(gr).all()
        assert (gr[1] == 0).all(), f"grad {name} of the fully masked batch"
        assert_close_to_reference(gr, r, t, what=f"grad {name}")


KERNEL_ATTN = [  # B, H, Lq, Lk, D: csrc/cpu/attention.cpp's forward per query up to 2 queries,
    (3, 2, 1, 64, 32),      # the text pooling of the small presets
    (2, 2, 2, 33, 24),
    (2, 3, 16, 77, 40),
    (1, 1, 7, 5, 3),        # D below one vector
    (2, 2, 4, 130, 129),    # D with a tail after full vectors
    # tiled above: query blocks of 64, key strips of 4 (AVX-512) / 2 vectors, tiles of 6
    # rows; tails of each, keys fewer than one vector, D not a multiple of 8
    (2, 3, 17, 77, 64),
    (3, 1, 130, 37, 33),
    (2, 2, 65, 1, 16),
    (2, 1, 70, 300, 80),
    (3, 2, 23, 9, 7),
    (2, 1, 64, 129, 129),
]


def _strided(t):
    """t as a view with non-unit B/H/L strides (a slice of a fused projection)."""
    b, h, l, d = t.shape
    big = torch.zeros(b, l, h, 2 * d + 3, dtype=t.dtype)
    view = big[..., 1:d + 1].permute(0, 2, 1, 3)
    view.copy_(t)
    return view


def _must_not_run(*args, **kwargs):
    raise AssertionError("the small-query kernel ran in eager mode")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", KERNEL_ATTN)
def test_attention_kernel(poisoned, dtype, case, monkeypatch):
    """Forward (out, lse) of csrc/cpu/attention.cpp and the backward paired with it (the
    custom op's path: the per-query kernel's, torch's flash backward above SMALL_QUERIES)
    against float64 autograd, strided inputs, a batch with every key masked."""
    monkeypatch.setattr(cb, "_TORCH_AVX512", False)     # the portable variant's tiled kernel too
    g = _gen(40)
    b, h, lq, lk, d = case
    assert cb._kernel(*(torch.empty(b, h, n, d, dtype=dtype) for n in (lq, lk, lk)))
    for strided in (True, False):
        make = _strided if strided else (lambda t: t)
        q, k, v = (make(randn(b, h, n, d, generator=g).to(dtype)) for n in (lq, lk, lk))
        mask = torch.rand(b, lk, generator=g) > 0.3
        mask[0, 0] = True
        mask[-1] = False
        for m in (mask, None):
            scale = 0.7 / math.sqrt(d)
            out, lse = cb.attention_fwd(q, k, v, m, scale)
            ref = reference.attention(q.double(), k.double(), v.double(), m, scale)
            assert_close_to_reference(out, ref, reference.attention(q, k, v, m, scale), what=f"out {case}")
            scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
            if m is not None:
                scores = scores.masked_fill(~m[:, None, None, :], float("-inf"))
                assert torch.isneginf(lse[-1]).all() and (out[-1] == 0).all()
            live = torch.isfinite(lse)
            torch.testing.assert_close(lse[live].double(), torch.logsumexp(scores, -1)[live], rtol=1e-5, atol=1e-5)
            go = randn(b, h, lq, d, generator=g).to(dtype)
            grads = cb.attention_bwd(go, q, k, v, m, out, lse, scale)
            leaves = [t.double().requires_grad_() for t in (q, k, v)]
            rg = torch.autograd.grad(reference.attention(*leaves, m, scale), leaves, go.double())
            lp = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            lg = torch.autograd.grad(reference.attention(*lp, m, scale), lp, go)
            for name, gr, r, t in zip("qkv", grads, rg, lg):
                assert gr.shape == r.shape and gr.dtype == dtype and gr.is_contiguous()
                assert_close_to_reference(gr, r, t, what=f"grad {name} {case}")
                if m is not None:
                    assert (gr[-1] == 0).all()


# (B, Lq, Lk, dtype, masked, grad) -> the path eager mode picks for a Bx2xLqxLkx32 call
EAGER_CHOICES = [
    (3, 1, 19, torch.float32, True, True, "kernel"), (3, 1, 19, torch.float32, False, False, "kernel"),
    (3, cb.SMALL_QUERIES, 19, torch.bfloat16, True, True, "kernel"),
    (3, cb.SMALL_QUERIES + 9, 19, torch.float32, True, True, "matmul"),
    (3, cb.SMALL_QUERIES + 9, 19, torch.float64, False, False, "matmul"),   # float64: no kernel
    (3, cb.SMALL_QUERIES + 9, 19, torch.float64, True, False, "sdpa"),
    (3, cb.SMALL_QUERIES + 9, 19, torch.float32, True, False, "kernel"),    # forward: the tiled kernel
    (3, 128, 128, torch.bfloat16, False, False, "kernel"),
    (1, 64, cb._KERNEL_MAX_KEYS + 1, torch.float32, True, False, "sdpa"),   # scores outgrow L2
    (3, cb.SMALL_QUERIES + 9, 19, torch.bfloat16, True, True, "sdpa"),
    (8, 64, 320, torch.float32, True, True, "matmul"),
    (8, 256, 320, torch.float32, True, True, "sdpa"),     # training: flash above 2^15 scores
    (1024, 64, 64, torch.float32, True, True, "sdpa"),    # and above 2^22 in all (saved)
]


def test_attention_eager_path_choice(monkeypatch):
    monkeypatch.setattr(cb, "_TORCH_AVX512", False)
    for b, lq, lk, dtype, masked, grad, path in EAGER_CHOICES:
        q, k = torch.empty(b, 2, lq, 32, dtype=dtype), torch.empty(b, 2, lk, 32, dtype=dtype)
        assert cb._eager_path(q, k, k, masked, grad) == path, (b, lq, lk, dtype, masked, grad)
    q16, k16 = torch.empty(8, 4, 64, 16), torch.empty(8, 4, 128, 16)
    assert cb._eager_path(q16, k16, k16, True, True) == "sdpa"    # head dim 16: flash trains faster
    q128, k128 = torch.empty(1, 8, 4096, 128), torch.empty(1, 8, 64, 128)
    assert cb._eager_path(q128, k128, k128, True, True) == "matmul"   # head dim 128: no per-head limit
    q64, k64 = torch.empty(1, 8, 4096, 64), torch.empty(1, 8, 64, 64)
    assert cb._eager_path(q64, k64, k64, True, True) == "sdpa"
    # torch on AVX2: unmasked training above the per-head limit runs the matmuls too
    qa, ka = torch.empty(8, 2, 256, 64), torch.empty(8, 2, 320, 64)
    assert cb._eager_path(qa, ka, ka, False, True) == "matmul"
    assert cb._eager_path(qa, ka, ka, True, True) == "sdpa"
    monkeypatch.setattr(cb, "_TORCH_AVX512", True)
    assert cb._eager_path(qa, ka, ka, False, True) == "sdpa"
    monkeypatch.setattr(cb, "_TORCH_AVX512", False)
    # the portable variant's tiled forward: up to 2048 keys where torch is no wider, 128
    # where torch runs AVX-512; the AVX-512 variant up to _KERNEL_MAX_KEYS
    portable = cb.cpu_isa() == "portable"
    for torch_avx512, limit in ((True, cb._PORTABLE_MAX_KEYS_AVX512), (False, cb._PORTABLE_MAX_KEYS)):
        monkeypatch.setattr(cb, "_TORCH_AVX512", torch_avx512)
        q = torch.empty(1, 2, 256, 64)
        for lk, path in ((limit, "kernel"), (limit + 1, "sdpa" if portable else "kernel")):
            k = torch.empty(1, 2, lk, 64)
            assert cb._eager_path(q, k, k, True, False) == path, (torch_avx512, lk)
        q1, k1 = torch.empty(3, 2, 1, 32), torch.empty(3, 2, limit + 1, 32)
        assert cb._eager_path(q1, k1, k1, True, False) == "kernel"     # per query: any key count


@pytest.mark.parametrize("path, lq", [(p, lq) for p in sorted(cb._EAGER_PATHS) for lq in (1, cb.SMALL_QUERIES + 9)])
@pytest.mark.parametrize("zeroes", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_eager_paths_keep_the_contract(path, zeroes, lq, dtype, monkeypatch):
    """Every eager path (forced for the call), through ops.attention with and without
    gradients, with and without a mask, against float64 autograd; a fully masked batch
    gets zeros and zero gradients. zeroes=False: a torch whose SDPA would not zero it."""
    from imagen_fast import ops
    monkeypatch.setitem(cb._SDPA_ZEROES_EMPTY, dtype, zeroes)
    ran = []
    monkeypatch.setattr(cb, "_eager_path", lambda q, k, v, masked, grad: ran.append(grad) or path)
    g = _gen(41 + lq)
    b, h, lk, d = 3, 2, 19, 24
    q, k, v = (randn(b, h, n, d, generator=g).to(dtype).requires_grad_() for n in (lq, lk, lk))
    mask = torch.rand(b, lk, generator=g) > 0.4
    mask[0, 0] = True
    mask[1] = False
    go = randn(b, h, lq, d, generator=g).to(dtype)
    for m in (mask, None):
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = reference.attention(*leaves, m)
        rg = torch.autograd.grad(ref, leaves, go.double())
        lp = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        lref = reference.attention(*lp, m)
        lg = torch.autograd.grad(lref, lp, go)
        with torch.no_grad():
            plain = ops.attention(q, k, v, m)
        out = ops.attention(q, k, v, m)
        assert ran[-2:] == [False, True]
        grads = torch.autograd.grad(out, [q, k, v], go)
        for o in (plain, out):
            assert o.dtype == dtype and o.shape == (b, h, lq, d)
            assert_close_to_reference(o.detach(), ref.detach(), lref.detach(), what=f"out {path}")
            if m is not None:
                assert (o[1] == 0).all()
        for name, gr, r, t in zip("qkv", grads, rg, lg):
            assert gr.dtype == dtype and torch.isfinite(gr).all()
            if m is not None:
                assert (gr[1] == 0).all(), f"grad {name} of the fully masked batch ({path})"
            assert_close_to_reference(gr, r, t, what=f"grad {name} {path}")


def test_attention_without_mask():
    q, k, v = (randn(2, 3, n, 8, generator=_gen(11)) for n in (5, 7, 7))
    out, lse = cb.attention_fwd(q, k, v, None, 0.35)
    ref = reference.attention(q.double(), k.double(), v.double(), None, 0.35)
    assert_close_to_reference(out, ref, reference.attention(q, k, v, None, 0.35))
    torch.testing.assert_close(lse.double(), torch.logsumexp(
        torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * 0.35, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq, lk", [(16, 40), (64, 128), (1, 64), (70, 130)])
def test_attention_eager_without_mask(lq, lk, dtype, monkeypatch):
    """Eager ops.attention without a mask on strided inputs (the kernel, the matmuls, SDPA
    for bfloat16 above SMALL_QUERIES with gradients): forward with and without gradients,
    and gradients, against float64 autograd."""
    from imagen_fast import ops
    monkeypatch.setattr(cb, "_TORCH_AVX512", False)
    g = _gen(43)
    b, h, d = 2, 3, 32
    q, k, v = (_strided(randn(b, h, n, d, generator=g).to(dtype)).requires_grad_() for n in (lq, lk, lk))
    small, matmul = lq <= cb.SMALL_QUERIES, dtype == torch.float32
    assert cb._eager_path(q, k, v, False, True) == ("kernel" if small else "matmul" if matmul else "sdpa")
    assert cb._eager_path(q, k, v, False, False) == "kernel"
    out = ops.attention(q, k, v, None, 0.4)
    go = randn(b, h, lq, d, generator=g).to(dtype)
    grads = torch.autograd.grad(out, [q, k, v], go)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*leaves, None, 0.4)
    rg = torch.autograd.grad(ref, leaves, go.double())
    lp = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    lref = reference.attention(*lp, None, 0.4)
    lg = torch.autograd.grad(lref, lp, go)
    with torch.no_grad():
        plain = ops.attention(q, k, v, None, 0.4)
    for o in (out.detach(), plain):
        assert o.dtype == dtype and o.shape == (b, h, lq, d)
        assert_close_to_reference(o, ref.detach(), lref.detach())
    for gr, r, t in zip(grads, rg, lg):
        assert gr.dtype == dtype
        assert_close_to_reference(gr, r, t)


# ------------------------------------------------------------ C++ argument checks
def test_cpp_rejects_what_could_corrupt_memory():
    x = torch.randn(2, 4, 3, 3)
    y = torch.empty_like(x)
    st = torch.empty(2, 2)
    p = x.data_ptr()
    gn = lambda **kw: _C.group_norm_fwd(**{**dict(  # noqa: E731
        x=p, y=y.data_ptr(), mean=st.data_ptr(), rstd=st.data_ptr(), weight=0, bias=0, scale=0,
        shift=0, N=2, C=4, S=9, G=2, eps=1e-5, channels_last=False, dtype=0, activation=1), **kw})
    gn()
    for bad in (dict(x=0), dict(y=0), dict(mean=0), dict(rstd=0), dict(N=0), dict(C=-1), dict(S=0),
                dict(G=0), dict(G=3), dict(dtype=7), dict(activation=5), dict(eps=0.0)):
        with pytest.raises(ValueError):
            gn(**bad)
    with pytest.raises(ValueError):
        _C.group_norm_bwd(0, p, st.data_ptr(), st.data_ptr(), 0, 0, 0, 0, y.data_ptr(), 0, 0, 0, 0,
                          2, 4, 9, 2, False, 0, 1)
    for bad in (dict(x=0), dict(y=0), dict(N=0), dict(L=-3), dict(dtype=-1), dict(percentile=1.5),
                dict(min_value=0.0)):
        kw = {**dict(x=p, y=y.data_ptr(), N=2, L=36, dtype=0, percentile=0.5, min_value=1.0), **bad}
        with pytest.raises(ValueError):
            _C.dynamic_threshold(**kw)
    coefs = torch.zeros(2, 5, dtype=torch.float64)
    base = dict(z=p, cond=p, uncond=0, noise=0, out=y.data_ptr(), coefs=coefs.data_ptr(), coef_stride=5, N=2,
                L=36, dtype=0, guidance_scale=1.0, threshold=2, percentile=0.9, min_value=1.0)
    _C.sampler_step(**base)
    _C.sampler_step(**{**base, "coef_stride": 0})
    for bad in (dict(z=0), dict(cond=0), dict(out=0), dict(coefs=0), dict(threshold=3), dict(N=-1),
                dict(guidance_scale=float("inf")), dict(coef_stride=1), dict(coef_stride=-5)):
        with pytest.raises(ValueError):
            _C.sampler_step(**{**base, **bad})


def test_backend_supports_predicates():
    x = torch.randn(2, 4, 3, 3)
    assert cb._gn_supports(x) is None
    assert cb._gn_supports(x.to(memory_format=torch.channels_last)) is None
    assert cb._gn_supports(x.transpose(2, 3)) is not None
    assert cb._gn_supports(x.int()) is not None
    assert cb._threshold_supports(x[:, :, ::2]) is not None
    assert cb._step_supports(x, x.to(memory_format=torch.channels_last)) is not None


# ---------------------------------------------------------- channel_rms_norm_silu
def _rms_grads(x, w, s, sh, act, gy, dtype, eps):
    """Reference grads in float64 and in the low-precision dtype (None for absent params)."""
    out = []
    for dt in (torch.float64, dtype):
        leaves = [None if t is None else t.to(dt).requires_grad_() for t in (x, w, s, sh)]
        y = reference.channel_rms_norm_silu(leaves[0], leaves[1], eps, leaves[2], leaves[3], act)
        live = [t for t in leaves if t is not None]
        gr = iter(torch.autograd.grad(y, live, gy.to(dt)))
        out.append([None if t is None else next(gr) for t in leaves])
    return out


def _check_rms(x, params, act, eps=1e-6, seed=0):
    """The cpu backend's forward and backward against the float64 reference."""
    dtype = x.dtype
    w, s, sh = params
    y, rstd = cb.channel_rms_norm_silu_fwd(x, w, eps, s, sh, act)
    assert y.stride() == x.stride() and y.dtype == dtype
    ref = reference.channel_rms_norm_silu(x.double(), _d64(w), eps, _d64(s), _d64(sh), act)
    lp = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    same = reference.channel_rms_norm_silu(x, lp(w), eps, lp(s), lp(sh), act)
    assert_close_to_reference(y, ref, same, what=f"y {tuple(x.shape)} {act}")
    rms = x.double().pow(2).mean(1).sqrt().clamp_min(eps).reshape(x.shape[0], -1)
    torch.testing.assert_close(rstd.double(), 1 / rms, rtol=2e-6, atol=0)
    gy = _layout(randn(*x.shape, generator=_gen(seed + 1)).to(dtype), not x.is_contiguous())
    needs = (True, w is not None, s is not None, sh is not None)
    grads = cb.channel_rms_norm_silu_bwd(gy, x, rstd, w, eps, s, sh, act, needs)
    r64, rlp = _rms_grads(x, w, s, sh, act, gy, dtype, eps)
    _check_norm_grads(["x", "weight", "scale", "shift"], grads, r64, rlp, [x, w, s, sh], x, act)


def _rms_case(shape, dtype, flags, seed):
    x, params = _gn_case(shape, dtype, (flags[0], False, flags[1], flags[2]), seed)
    return x, [params[0], params[2], params[3]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu", "none"])
def test_rms_norm_every_film_variant(poisoned, dtype, channels_last, activation):
    for i, flags in enumerate(itertools.product([False, True], repeat=3)):   # weight, scale, shift
        x, params = _rms_case((2, 20, 5, 7), dtype, flags, seed=i)
        _check_rms(_layout(x, channels_last), params, activation, seed=i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (3, 17, 9, 11), (2, 33, 70, 3), (1, 64, 20, 20),
                                   (2, 5, 3, 4, 6)])
def test_rms_norm_odd_shapes(poisoned, dtype, channels_last, shape):
    """C below, between and above a vector; S over several position blocks (contiguous)
    and over the 256-position flush of the channels-last sums."""
    x, params = _rms_case(shape, dtype, (True, True, True), seed=3)
    _check_rms(_layout(x, channels_last), params, "silu")


@pytest.mark.parametrize("threads", [2, 3], indirect=True)
@pytest.mark.parametrize("channels_last", [False, True])
def test_rms_norm_threads(poisoned, threads, channels_last):
    """Samples split across threads mid-sample: the per-thread channel sums merge."""
    x, params = _rms_case((3, 24, 41, 13), torch.float32, (True, True, True), seed=4)
    _check_rms(_layout(x, channels_last), params, "gelu")


@pytest.mark.parametrize("threads", [2, 3], indirect=True)
@pytest.mark.parametrize("shape", [(8, 128, 32, 32), (2, 96, 70, 90)])
def test_rms_norm_streamed_output(poisoned, threads, shape):
    """Contiguous float32 outputs of 4 MiB and more go out by streaming stores (whole
    position blocks; a sample's last, partial block by plain stores)."""
    x, params = _rms_case(shape, torch.float32, (True, True, True), seed=5)
    assert x.numel() * 4 >= 4 << 20
    _check_rms(x, params, "silu")


def test_rms_norm_argument_checks():
    x = torch.randn(2, 4, 3, 3)
    y, r = torch.empty_like(x), torch.empty(2, 9)
    fwd = lambda **kw: _C.channel_rms_norm_fwd(**{**dict(  # noqa: E731
        x=x.data_ptr(), y=y.data_ptr(), rstd=r.data_ptr(), weight=0, scale=0, shift=0, N=2, C=4,
        S=9, eps=1e-6, channels_last=False, dtype=0, activation=1), **kw})
    fwd()
    for bad in (dict(x=0), dict(y=0), dict(rstd=0), dict(N=0), dict(C=-1), dict(S=0),
                dict(dtype=9), dict(activation=3), dict(eps=0.0), dict(eps=float("inf"))):
        with pytest.raises(ValueError):
            fwd(**bad)
    with pytest.raises(ValueError):
        _C.channel_rms_norm_bwd(0, x.data_ptr(), r.data_ptr(), 0, 0, 0, y.data_ptr(), 0, 0, 0,
                                2, 4, 9, 1e-6, False, 0, 1)
    with pytest.raises(ValueError):
        _C.dynamic_threshold(x.data_ptr(), y.data_ptr(), 2, 36, 0, 0.5, 1.0, 0.0)


# ------------------------------------------------------------------ the ISA switch
def _cpu_flags():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_avx512_variant_present_where_the_cpu_has_it():
    """A build or detection fault must not hide the AVX-512 kernels behind a skip."""
    flags = _cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        pytest.skip("this CPU has no AVX-512")
    status = cb.cpu_isas()["avx512"]
    assert status == "available" or ("avx512_bf16" not in flags and "avx512bf16" in status), status
    assert _C.build_info()["cpu_kernel_variants"]["avx512"] == status


def test_isa_switch_choices(isa):
    assert cb.cpu_isa() == isa and _C.build_info()["cpu_kernels"] == isa
    with pytest.raises(ValueError, match="IMAGEN_FAST_CPU_ISA must be auto, portable or avx512"):
        _C.set_cpu_isa("avx2")
    assert cb.cpu_isa() == isa, "a refused choice must leave the active variant alone"
    with cb.use_cpu_isa("portable"):
        assert cb.cpu_isa() == "portable" and _C.cpu_isa_flags()
    assert cb.cpu_isa() == isa


def test_isa_environment_variable(isa):
    """IMAGEN_FAST_CPU_ISA is applied when the cpu backend loads (a bad value raises the
    ValueError of test_isa_switch_choices, naming the variable)."""
    code = ("from imagen_fast.kernels import cpu as cb; print(cb.cpu_isa()); import imagen_fast._C as C; "
            "C.set_cpu_isa('auto'); print(C.cpu_isa())")
    env = dict(os.environ, IMAGEN_FAST_CPU_ISA=isa, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    best = "avx512" if cb.cpu_isas()["avx512"] == "available" else "portable"
    assert out.stdout.split() == [isa, best]
