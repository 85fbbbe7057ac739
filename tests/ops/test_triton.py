"""Triton-specific checks: every launch plan of every kernel, at tiny shapes.

Without a GPU these run in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors,
~4000x slower than a GPU: shapes stay tiny and the split / multi-block paths are
forced through the kernels' test hooks). On a GPU the same tests run on CUDA, plus
what the interpreter cannot show (real bf16 dots, determinism run to run, sizes above
torch.quantile's limit). The op-contract suite for backend triton is
tests/ops/test_ops.py -k triton.

Tolerance: tests/support/numerics.py (error vs the float64 reference at most a small multiple
of PyTorch's own same-dtype error, plus a dtype floor).
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before any @triton.jit is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from support.device import DEVICE  # noqa: E402
from imagen_fast import ops  # noqa: E402
from imagen_fast.kernels.layout import ACTIVATION_CODES  # noqa: E402
from imagen_fast.ops import dispatch, reference  # noqa: E402
from support.numerics import assert_close_to_reference, gen, group_norm_inputs, randn  # noqa: E402

_status = dispatch.available_backends()["triton"]
pytestmark = pytest.mark.skipif(_status != "available", reason=f"backend triton: {_status}")
if _status == "available":
    from imagen_fast.kernels.triton import _common as cm  # noqa: E402
    from imagen_fast.kernels.triton import attention as tattn  # noqa: E402
    from imagen_fast.kernels.triton import group_norm as tgn  # noqa: E402
    from imagen_fast.kernels.triton import rms_norm as trms  # noqa: E402
    from imagen_fast.kernels.triton import threshold as tthr  # noqa: E402

GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _triton():
    with ops.use_backend("triton"):
        yield


_gen = gen


def _dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


def _d64(t):
    return None if t is None else t.double()


# ----------------------------------------------------------------- group_norm_silu
# (name, plan overrides): every code path of the kernels at C=96, G=32 (3 channels a
# group, not a power of two) and 7x9 pixels.
GN_BASE = ((2, 96, 7, 9), 32)
GN_PLANS = [
    ("fused", GN_BASE, {}),
    ("looped", GN_BASE, dict(fused=False, block_s=16, split=1)),
    ("split", GN_BASE, dict(fused=False, block_s=16, split=3)),
    # 6 channels a group in sub-blocks of 4: the channel loop and its partial block
    ("split_channel_blocks", ((2, 12, 7, 9), 2), dict(channel_block=4, block_s=16, split=2)),
    # 8 groups a program with 32 groups: no remainder; see other_ranks for one
    ("groups_per_program", GN_BASE, dict(groups_per_program=8, fused=False, block_s=32,
                                         split=2)),
]
GN_VARIANTS = [("silu", True, True), ("gelu", True, False), (None, False, True)]


def _gn_case(shape, dtype, film, affine, seed):
    return group_norm_inputs(shape, dtype, film, affine, seed)


def _layout(x, channels_last):
    if not channels_last:
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else
                        torch.channels_last_3d)


@pytest.mark.parametrize("plan_name,case,plan", GN_PLANS, ids=[p[0] for p in GN_PLANS])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_plans_fwd_bwd(poison, plan_name, case, plan, channels_last, dtype):
    i = [p[0] for p in GN_PLANS].index(plan_name) + DTYPES.index(dtype)
    activation, film, affine = GN_VARIANTS[i % len(GN_VARIANTS)]
    shape, groups = case
    x, w, b, s, sh = _gn_case(shape, dtype, film, affine, seed=i)
    leaves = [None if t is None else t.to(DEVICE).requires_grad_() for t in (x, w, b, s, sh)]
    xd = _layout(leaves[0], channels_last)
    gy = randn(*shape, dtype=dtype, generator=_gen(99))
    with tgn.force_plan(**plan):
        y = ops.group_norm_silu(xd, groups, leaves[1], leaves[2], scale=leaves[3],
                                shift=leaves[4], activation=activation)
        assert ops.is_channels_last(y) == channels_last
        live = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(y, live, gy.to(DEVICE))

    r_leaves = [None if t is None else t.double().requires_grad_() for t in (x, w, b, s, sh)]
    ref = reference.group_norm_silu(r_leaves[0], groups, r_leaves[1], r_leaves[2], 1e-5,
                                    r_leaves[3], r_leaves[4], activation)
    r_grads = torch.autograd.grad(ref, [t for t in r_leaves if t is not None], gy.double())
    l_leaves = [None if t is None else t.to(dtype).requires_grad_() for t in (x, w, b, s, sh)]
    same = reference.group_norm_silu(l_leaves[0], groups, l_leaves[1], l_leaves[2], 1e-5,
                                     l_leaves[3], l_leaves[4], activation)
    l_grads = torch.autograd.grad(same, [t for t in l_leaves if t is not None], gy)
    assert_close_to_reference(y.detach().cpu(), ref.detach(), same.detach(), what="y")
    for k, (g, r, t) in enumerate(zip(grads, r_grads, l_grads)):
        floor = None if k == 0 else 1e-4 * math.sqrt(x.numel()) * r.abs().max().item()
        assert g.dtype == live[k].dtype
        assert_close_to_reference(g.cpu(), r, t, floor=floor, what=f"grad {k}")


@pytest.mark.parametrize("plan_name,case,plan", GN_PLANS[:3], ids=[p[0] for p in GN_PLANS[:3]])
def test_group_norm_statistics(plan_name, case, plan):
    """Saved mean / rstd (float32) vs float64, on data with a large mean (where
    E[x^2] - mean^2 would lose the variance)."""
    x = (randn(2, 96, 7, 9, generator=_gen(5)) + 300.0).to(DEVICE)
    with tgn.force_plan(**plan):
        _, mean, rstd = tgn.group_norm_silu_fwd(x, 32, None, None, 1e-5, None, None, "none")
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (2, 32)
    rm, rr = reference.group_norm_stats(x.cpu().double(), 32, 1e-5)
    torch.testing.assert_close(mean.cpu().double(), rm, rtol=1e-6, atol=0)
    torch.testing.assert_close(rstd.cpu().double(), rr, rtol=2e-4, atol=0)


@pytest.mark.parametrize("shape,groups,channels_last", [
    ((3, 12, 11), 3, False),          # 1-D spatial
    ((2, 8, 3, 4, 5), 2, True),       # 3-D spatial, channels-last-3d
    ((5, 6), 3, False),               # no spatial dims
    ((1, 4, 130), 1, False),          # one group
    ((2, 20, 3, 3), 5, True),         # 4 groups a program over 5 groups: a masked remainder
])
def test_group_norm_other_ranks(shape, groups, channels_last):
    x, w, b, s, sh = _gn_case(shape, torch.float32, True, True, seed=3)
    xd = _layout(x.to(DEVICE), channels_last).requires_grad_()
    with tgn.force_plan(block_s=16, **({"groups_per_program": 4} if groups == 5 else {})):
        y = ops.group_norm_silu(xd, groups, *_dev(w, b), scale=s.to(DEVICE),
                                shift=sh.to(DEVICE), activation="gelu")
        (gx,) = torch.autograd.grad(y.sum(), [xd])
    xr = x.double().requires_grad_()
    ref = reference.group_norm_silu(xr, groups, w.double(), b.double(), 1e-5, s.double(),
                                    sh.double(), "gelu")
    (rx,) = torch.autograd.grad(ref.sum(), [xr])
    assert_close_to_reference(y.detach().cpu(), ref.detach(), floor=2e-6)
    assert_close_to_reference(gx.cpu(), rx, floor=2e-6 * max(1.0, rx.abs().max().item()))


def test_group_norm_float64():
    x, w, b, s, sh = _gn_case((2, 6, 3, 5), torch.float64, True, True, seed=4)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, w, b, s, sh)]
    with tgn.force_plan(split=2, fused=False, block_s=4):
        y = ops.group_norm_silu(leaves[0], 3, *leaves[1:3], scale=leaves[3], shift=leaves[4],
                                activation="gelu")
        grads = torch.autograd.grad(y.sum(), leaves)
    r = [t.clone().requires_grad_() for t in (x, w, b, s, sh)]
    ref = reference.group_norm_silu(r[0], 3, r[1], r[2], 1e-5, r[3], r[4], "gelu")
    r_grads = torch.autograd.grad(ref.sum(), r)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.detach().cpu(), ref.detach(), rtol=1e-12, atol=1e-12)
    for g, rg in zip(grads, r_grads):
        torch.testing.assert_close(g.cpu(), rg, rtol=1e-10, atol=1e-10)


def test_group_norm_plan_choice():
    """Small N*G against the SM count splits the spatial axis; small groups fuse."""
    cfg = tgn._FWD_CONFIGS[0]
    p = tgn.make_plan(1, 128, 256 * 256, 32, False, 132, cfg)   # SR 256, batch 1
    assert p.mode == "split" and p.SPLIT > 1 and 32 * p.SPLIT >= 2 * 132
    p = tgn.make_plan(32, 1024, 16 * 16, 32, True, 132, cfg)    # base 64 at 16 px
    assert p.mode == "fused"
    p = tgn.make_plan(64, 256, 64 * 64, 32, False, 132, cfg)    # many groups, big groups
    assert p.mode == "looped"
    p = tgn.make_plan(2, 128, 4096, 32, True, 132, cfg)
    assert p.GB * p.CB >= 64, "a channels-last tile should span >= 64 contiguous channels"


# ------------------------------------------------------------ channel_rms_norm_silu
# Tiles smaller than the tensor: several channel blocks (the two-pass walk, with a
# partial last block) and several position blocks (partial sums merged on the host).
RMS_PLANS = [("one_tile", {}), ("channel_blocks", dict(block_c=4, block_s=16)),
             ("position_blocks", dict(block_c=16, block_s=8))]


@pytest.mark.parametrize("plan_name,plan", RMS_PLANS, ids=[p[0] for p in RMS_PLANS])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_rms_norm_plans_fwd_bwd(poison, plan_name, plan, channels_last, dtype):
    i = [p[0] for p in RMS_PLANS].index(plan_name)
    activation = ["silu", "gelu", None][i]
    shape = (2, 10, 5, 7)
    x, w, _, s, sh = group_norm_inputs(shape, dtype, True, True, seed=i)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, w, s, sh)]
    gy = randn(*shape, dtype=dtype, generator=_gen(98))
    with trms.force_plan(**plan):
        y = ops.channel_rms_norm_silu(_layout(leaves[0], channels_last), leaves[1], 1e-6,
                                      leaves[2], leaves[3], activation)
        assert ops.is_channels_last(y) == channels_last
        grads = torch.autograd.grad(y, leaves, gy.to(DEVICE))
    refs = []
    for dt in (torch.float64, dtype):
        r_leaves = [t.to(dt).requires_grad_() for t in (x, w, s, sh)]
        r = reference.channel_rms_norm_silu(r_leaves[0], r_leaves[1], 1e-6, r_leaves[2],
                                            r_leaves[3], activation)
        refs.append((r.detach(), torch.autograd.grad(r, r_leaves, gy.to(dt))))
    (ref, r_grads), (same, l_grads) = refs
    assert_close_to_reference(y.detach().cpu(), ref, same, what="y")
    for k, (g, r, t) in enumerate(zip(grads, r_grads, l_grads)):
        floor = None if k == 0 else 1e-4 * math.sqrt(x.numel()) * r.abs().max().item()
        assert g.dtype == leaves[k].dtype
        assert_close_to_reference(g.cpu(), r, t, floor=floor, what=f"grad {k}")


def test_rms_norm_plan_shape():
    """The unit-stride axis gets the long side of the tile."""
    short = trms.TILE // 256
    assert trms.make_plan(512, 4096, channels_last=False) == (short, 256, 512 // short)
    assert trms.make_plan(512, 4096, channels_last=True) == (256, short, 2)
    assert trms.make_plan(3, 5, channels_last=False) == (4, 8, 1)


# ----------------------------------------------------------------------- attention
ATTN_CASES = [  # (B, H, Lq, Lk, D, blocks)
    (2, 2, 20, 77, 40, (16, 16)),      # head dim 40, Lk = 77, Lq != Lk, many blocks
    (2, 1, 9, 40, 128, (16, 32)),
    (1, 2, 33, 5, 8, None),            # Lk < one block, D = 8 padded to 16
    (3, 1, 16, 70, 24, (32, 16)),
]


def _attn_mask(b, lk, seed):
    m = torch.rand(b, lk, generator=_gen(seed)) > 0.3
    m[:, 0] = True
    if lk >= 48:
        m[0, 16:32] = False            # a whole key block of padding in the middle
        m[0, 40:] = False              # and a padded tail
    if b > 1:
        m[-1] = False                  # a batch element with no key at all
    return m


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "x".join(map(str, c[:5])))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_attention_fwd_bwd(poison, case, dtype, masked):
    b, h, lq, lk, d, blocks = case
    g = _gen(sum(case[:5]))
    q, k, v = (randn(b, h, n, d, dtype=dtype, generator=g) for n in (lq, lk, lk))
    mask = _attn_mask(b, lk, seed=lq) if masked else None
    leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    go = randn(b, h, lq, d, dtype=dtype, generator=g)
    with tattn.force_blocks(fwd=blocks, bwd=blocks):
        out = ops.attention(*leaves, key_padding_mask=None if mask is None else mask.to(DEVICE))
        grads = torch.autograd.grad(out, leaves, go.to(DEVICE))
    r = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*r, mask)
    r_grads = torch.autograd.grad(ref, r, go.double())
    lp = [t.clone().requires_grad_() for t in (q, k, v)]
    same = reference.attention(*lp, mask)
    l_grads = torch.autograd.grad(same, lp, go)
    assert_close_to_reference(out.detach().cpu(), ref.detach(), same.detach(), what="out")
    for name, gr, rg, lg in zip("qkv", grads, r_grads, l_grads):
        assert gr.dtype == dtype
        assert_close_to_reference(gr.cpu(), rg, lg, what=f"d{name}")
        if masked and b > 1:
            assert (gr[-1] == 0).all(), "a fully masked batch must get zero gradients"
    if masked and b > 1:
        assert (out[-1] == 0).all(), "fully masked rows must output zeros"


def test_attention_lse_and_strides():
    """lse (float32, natural log, -inf for rows with no key) and arbitrary strides:
    q from a (B, L, H, D) tensor, k and v slices of one packed kv tensor."""
    b, h, lq, lk, d = 2, 3, 11, 45, 16
    g = _gen(7)
    q = randn(b, lq, h, d, generator=g).to(DEVICE).transpose(1, 2)
    kv = randn(b, h, lk, 2 * d, generator=g).to(DEVICE)
    k, v = kv[..., :d], kv[..., d:]
    mask = _attn_mask(b, lk, 3).to(DEVICE)
    assert not q.is_contiguous() and not k.is_contiguous()
    with tattn.force_blocks(fwd=(16, 16)):
        out, lse = tattn.attention_fwd(q, k, v, mask, 0.25)
    qc, kc, vc = (t.cpu().double() for t in (q, k, v))
    scores = torch.einsum("bhqd,bhkd->bhqk", qc, kc) * 0.25
    scores = scores.masked_fill(~mask.cpu()[:, None, None, :], float("-inf"))
    ref_lse = torch.logsumexp(scores, dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (b, h, lq)
    torch.testing.assert_close(lse[0].cpu().double(), ref_lse[0], rtol=1e-6, atol=1e-6)
    assert torch.isneginf(lse[-1]).all()
    ref = reference.attention(qc, kc, vc, mask.cpu(), 0.25)
    assert_close_to_reference(out.cpu(), ref, floor=2e-6)


def test_attention_float64():
    b, h, lq, lk, d = 2, 1, 6, 21, 8
    g = _gen(8)
    leaves = [randn(b, h, n, d, dtype=torch.float64, generator=g).to(DEVICE).requires_grad_()
              for n in (lq, lk, lk)]
    mask = _attn_mask(b, lk, 4).to(DEVICE)
    with tattn.force_blocks(fwd=(16, 16), bwd=(16, 16)):
        out = ops.attention(*leaves, key_padding_mask=mask)
        grads = torch.autograd.grad(out.sum(), leaves)
    r = [t.detach().cpu().clone().requires_grad_() for t in leaves]
    ref = reference.attention(*r, mask.cpu())
    r_grads = torch.autograd.grad(ref.sum(), r)
    torch.testing.assert_close(out.detach().cpu(), ref.detach(), rtol=1e-12, atol=1e-12)
    for gr, rg in zip(grads, r_grads):
        torch.testing.assert_close(gr.cpu(), rg, rtol=1e-11, atol=1e-11)


def test_attention_block_list():
    mask = _attn_mask(3, 77, 9)
    mask[1, 16:] = False
    blocks, count, nblk = tattn._block_list(mask.to(DEVICE).view(torch.uint8), 77, 16)
    assert nblk == 5
    for bi in range(3):
        want = [j for j in range(nblk) if mask[bi, j * 16:(j + 1) * 16].any()]
        assert count[bi].item() == len(want)
        assert blocks[bi, :len(want)].cpu().tolist() == want


def test_attention_refuses_big_head_dim():
    q = torch.randn(1, 1, 4, 136, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        ops.attention(q, q, q)


# ------------------------------------------------------------- dynamic thresholding
def _data(kind, n, m, g):
    if kind == "normal":
        return torch.randn(n, m, generator=g, dtype=torch.float64) * 3
    if kind == "ties":
        return torch.randint(-4, 5, (n, m), generator=g).double() * 0.75
    if kind == "wide":      # magnitudes from 1e-9 to 1e9: every exponent digit used
        return torch.exp(torch.randn(n, m, generator=g, dtype=torch.float64) * 7) * \
            torch.sign(torch.randn(n, m, generator=g, dtype=torch.float64))
    return torch.randn(n, m, generator=g, dtype=torch.float64) * 1e-3 + 2.0   # "close"


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["normal", "ties", "wide", "close"])
def test_percentile_is_exact(dtype, kind):
    """s per sample = torch.quantile's linear-interpolation percentile of |x|, exactly
    (up to the final lerp's rounding), with several programs per sample."""
    g = _gen(hash((kind, str(dtype))) % 1000)
    cases = ((1, 0.7), (2, 1.0), (37, 0.0), (181, 0.995), (250, 0.3183))
    if dtype == torch.float64:      # 6 radix levels: the slowest under the interpreter
        cases = cases[2:4]
    for m, p in cases:
        big = torch.finfo(dtype).max / 4          # finite data: no inf - inf in the lerp
        x = _data(kind, 3, m, g).clamp(-big, big).to(dtype).to(DEVICE)
        par = tthr._params(x, [tthr._rank(p, m)[1], 1e-30, 0.0, math.inf])
        with tthr.force_launch(block=16, programs=3):
            s = tthr._percentile_scale(x, x.dtype, 3, m, p, 1e-30, par=par)
        ref = reference.quantile_linear(x.cpu().double().abs(), p).clamp(min=1e-30)
        rtol = 1e-15 if dtype == torch.float64 else 3e-7
        torch.testing.assert_close(s.cpu().double(), ref, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dynamic_threshold_layouts(poison, dtype):
    g = _gen(11)
    x = (randn(3, 4, 6, 5, generator=g) * torch.tensor([3.0, 0.3, 1.7]).reshape(3, 1, 1, 1))
    x = x.to(dtype)
    for cl in (False, True):
        xd = _layout(x.to(DEVICE), cl)
        with tthr.force_launch(block=32, programs=2):
            y = ops.dynamic_threshold(xd, 0.9, min_value=1.0)
        assert ops.is_channels_last(y) == cl and y.dtype == dtype
        ref = reference.dynamic_threshold(x.double(), 0.9, 1.0)
        assert_close_to_reference(y.cpu(), ref, ref.to(dtype), what=f"cl={cl}")


@pytest.mark.parametrize("threshold", ["dynamic", "static", "none"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_sampler_step_fused(poison, threshold, dtype):
    shape = (3, 3, 7, 9)
    g = _gen(12)
    z, cond, uncond, noise = (randn(*shape, dtype=dtype, generator=g) for _ in range(4))
    at = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    as_ = torch.tensor([0.5, 0.8, 1.0], dtype=torch.float64)
    st, ss = (1 - at ** 2).sqrt(), (1 - as_ ** 2).sqrt()
    guided = dtype != torch.float16
    cl = dtype == torch.bfloat16
    zd, cd, ud, nd = (None if t is None else _layout(t.to(DEVICE), cl)
                      for t in (z, cond, uncond if guided else None, noise))
    with tthr.force_launch(block=32, programs=3):
        out = ops.sampler_step(zd, cd, ud, guidance_scale=4.5, alpha_t=at, sigma_t=st,
                               alpha_s=as_, sigma_s=ss, sampler="ddim", eta=0.3, noise=nd,
                               threshold=threshold, percentile=0.95, min_value=1.0)
    assert out.dtype == dtype and ops.is_channels_last(out) == cl
    coefs = ops.step_coefficients(at, st, as_, ss, sampler="ddim", eta=0.3)
    u = uncond if guided else None
    ref = reference.sampler_step(z.double(), cond.double(), _d64(u), 4.5, coefs,
                                 noise.double(), threshold, 0.95, 1.0)
    if dtype == torch.float64:
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-12, atol=1e-12)
        return
    same = reference.sampler_step(z, cond, u, 4.5, coefs, noise, threshold, 0.95, 1.0)
    assert_close_to_reference(out.cpu(), ref, same)


# ------------------------------------------------------------------- shared pieces
@triton.jit
def _act_kernel(x_ptr, y_ptr, g_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m)
    tl.store(y_ptr + offs, cm.activation(x, ACT), mask=m)
    tl.store(g_ptr + offs, cm.activation_grad(x, ACT), mask=m)


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_activation_maths(act):
    """Activations without libdevice: float32 within a few ulp of float64 over a
    wide range (the gelu tail for h << 0 included), float64 to ~1e-15."""
    import torch.nn.functional as F
    f = F.silu if act == "silu" else F.gelu
    for dt, rtol in ((torch.float32, 6e-7), (torch.float64, 1e-14)):
        x = torch.linspace(-9, 9, 512, dtype=dt, device=DEVICE)
        y, gr = torch.empty_like(x), torch.empty_like(x)
        _act_kernel[(1,)](x, y, gr, x.numel(), ACT=ACTIVATION_CODES[act], BLOCK=512)
        xr = x.cpu().double().requires_grad_()
        ref = f(xr)
        (rg,) = torch.autograd.grad(ref.sum(), [xr])
        scale = ref.abs().detach() + (1e-30 if dt == torch.float64 else 1e-7)
        assert ((y.cpu().double() - ref.detach()).abs() / scale).max() < rtol * 4
        assert (gr.cpu().double() - rg).abs().max() < rtol * 8


def test_pick_config_tunes_once_and_skips_failures(monkeypatch):
    """The autotuner (GPU only) on fake timings: best config wins, a config that fails
    to launch is skipped, the result is cached per shape class."""
    monkeypatch.setattr(cm, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(cm.torch.cuda, "synchronize", lambda *a: None)
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    calls = []

    def run(cfg):
        calls.append(cfg)
        if cfg == "bad":
            raise RuntimeError("out of resources")

    monkeypatch.setattr(cm.triton.testing, "do_bench",
                        lambda fn, **kw: (fn(), times[calls[-1]])[1])
    key = ("test-class", len(cm._tuned))
    assert cm.pick_config("t", key, DEVICE, ["a", "bad", "b", "c"], run, "a") == "b"
    n = len(calls)
    assert cm.pick_config("t", key, DEVICE, ["a", "bad", "b", "c"], run, "a") == "b"
    assert len(calls) == n, "a tuned shape class must not be re-timed"


def test_interpreter_uses_fixed_configs():
    if GPU:
        pytest.skip("interpreter only")
    assert not cm.autotune_enabled(DEVICE)
    assert cm.pick_config("x", (), DEVICE, ["a", "b"], lambda c: None, "dflt") == "dflt"


# ---------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_gpu_deterministic_twice():
    """No atomics in the float paths: two runs agree bit for bit."""
    x = torch.randn(2, 256, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(2, 8, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(2, 8, 333, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.rand(2, 333, device="cuda") > 0.2
    outs = []
    for _ in range(2):
        y = ops.group_norm_silu(x, 32)
        gx = torch.autograd.grad(y.float().square().sum(), [x])[0]
        o = ops.attention(q, kv, kv, mask)
        gq, gk = torch.autograd.grad(o.float().square().sum(), [q, kv])
        t = ops.dynamic_threshold(x.detach() * 3)
        outs.append([y, gx, o, gq, gk, t])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_threshold_above_quantile_limit():
    x = torch.randn(8, 3, 1024, 1024, device="cuda") * 2
    y = ops.dynamic_threshold(x, 0.995)
    s = reference.quantile_linear(x.reshape(8, -1).abs().double(), 0.995).clamp(min=1.0)
    s = s.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(y.double(), x.double().clamp(-s, s) / s, rtol=0, atol=2e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [32, 64, 128, 40])
def test_gpu_attention_full_shapes(d):
    b, h, lq, lk = 2, 4, 1024, 128 + 1024
    q = torch.randn(b, h, lq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, h, lk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, h, lk, d, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(b, lk, dtype=torch.bool, device="cuda")
    mask[0, 60:128] = False
    out = ops.attention(q, k, v, mask)
    ref = reference.attention(q.double(), k.double(), v.double(), mask)
    same = reference.attention(q, k, v, mask)
    assert_close_to_reference(out, ref, same)


# ----------------------------------------------------------------------- benchmark
def test_benchmark_script_importable_and_refuses_without_gpu():
    from imagen_fast.bench import bench_ops
    assert callable(bench_ops.main)
    if GPU:
        return
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "imagen_fast.bench.bench_ops", "--device", "cuda"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert "GPU" in (r.stdout + r.stderr)
