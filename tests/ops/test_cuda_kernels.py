"""Backend "cuda" (csrc/cuda): checks beyond the backend-parametrized op contract.

Without a GPU (CI, these 2-core machines):
  * the module is built with CUDA whenever nvcc exists (a CUDA compile error fails);
  * asking backend "cuda" for CPU tensors, or calling a kernel with no device, raises a
    clear error (never a launch on garbage pointers);
  * a Python twin of the kernels checks what can be checked without running them:
    the planner's choices for real device properties, the exact index mapping of every
    kernel (each element read/written once, by the thread that owns its channel), the
    backward algebra (P, Q, c2, c3 against autograd), and the radix-select state machine
    (digit layout per dtype, two prefixes) against reference.quantile_linear.
  * the kernels' own source, compiled for a host emulation of CUDA (threads as fibers,
    real __syncthreads / warp-intrinsic semantics, see csrc/include/imagen_fast/
    cuda_emulation.h), runs the backend's functions on CPU tensors against the float64
    reference: every path, dtype, layout and chunking, with poisoned outputs and
    workspace.
On a GPU, additionally: one-pass and split paths forced, split chunk counts forced,
8x3x1024x1024 thresholding, bit-for-bit determinism, non-default streams, and
torch.compile through the cuda backend. tests/ops/run_sanitizer.sh runs this file's
small shapes under compute-sanitizer.
"""
import functools
import hashlib
import importlib.util
import math
import os
import shutil
import subprocess
import sysconfig
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from support.device import DEVICE
from imagen_fast import ops
from imagen_fast._compiled import load_extension
from imagen_fast.ops import dispatch, reference
from support.numerics import assert_close_to_reference, gen, group_norm_inputs, randn

C = load_extension()
HAS_CUDA_BUILD = C is not None and C.HAS_CUDA
ON_GPU = DEVICE.type == "cuda" and HAS_CUDA_BUILD
SANITIZER = os.environ.get("IMAGEN_FAST_SANITIZER") == "1"

needs_build = pytest.mark.skipif(not HAS_CUDA_BUILD, reason="imagen_fast._C built without CUDA")
not_under_sanitizer = pytest.mark.skipif(SANITIZER, reason="large shape: skipped under compute-sanitizer")

# Device properties of the GPUs the kernels are built for (planning needs no device).
H100 = dict(multiprocessors=132, max_threads_per_sm=2048)
A100 = dict(multiprocessors=108, max_threads_per_sm=2048)
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
ALIGNED = 1 << 20  # a fake 16-byte-aligned device address for planning


_gen = gen


def _cl(x):
    if x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.ndim == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


# ================================================================ without a GPU
def _nvcc_present() -> bool:
    return bool(shutil.which("nvcc")) or os.path.exists(
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))


def test_module_built_with_cuda_when_nvcc_present():
    if C is None:
        pytest.skip("imagen_fast._C not built")
    if not _nvcc_present() or os.environ.get("IMAGEN_FAST_CUDA") == "0":
        pytest.skip("no nvcc at build time")
    info = C.build_info()
    assert info["cuda"] and C.HAS_CUDA
    assert "80" in info["cuda_archs"] and "90a" in info["cuda_archs"]
    for name in ("cuda_group_norm_forward", "cuda_group_norm_backward", "cuda_group_norm_plan",
                 "cuda_dynamic_threshold", "cuda_sampler_step", "cuda_threshold_plan"):
        assert hasattr(C, name), name
    assert dispatch.available_backends()["cuda"] == "available"
    if torch.version.cuda is not None:
        assert C.cuda_device_count() == torch.cuda.device_count()
    elif not any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl")):
        assert C.cuda_device_count() == 0


@needs_build
def test_backend_cuda_refuses_cpu_tensors():
    if ON_GPU:
        pytest.skip("CPU-tensor check")
    x = randn(2, 8, 5, 7, generator=_gen(1))
    calls = {
        "group_norm_silu_fwd": lambda: ops.group_norm_silu(x, 4),
        "dynamic_threshold": lambda: ops.dynamic_threshold(x, 0.9),
        "sampler_step": lambda: ops.sampler_step(x, x, alpha_t=0.8, sigma_t=0.6, alpha_s=0.9,
                                                 sigma_s=0.3),
    }
    with ops.use_backend("cuda"):
        for op, call in calls.items():
            with pytest.raises(ValueError, match=f"{op}: requested backend 'cuda' cannot run "
                                                 f"this call: backend 'cuda' needs CUDA tensors"):
                call()
    from imagen_fast.kernels import cuda as cb
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        cb.group_norm_silu_fwd(x, 4, None, None, 1e-5, None, None, "silu")
    with pytest.raises(ValueError, match="x0 must be a CUDA tensor"):
        cb.dynamic_threshold(x, 0.9, 1.0)


@needs_build
def test_kernel_entry_without_device_is_a_clear_error():
    if C.cuda_device_count() > 0:
        pytest.skip("a device is present")
    args = dict(N=2, C=8, S=35, G=4, x=ALIGNED, y=ALIGNED, mean=ALIGNED, rstd=ALIGNED)
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        C.cuda_group_norm_forward(args)
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        C.cuda_dynamic_threshold(dict(N=2, L=10, x=ALIGNED, out=ALIGNED))
    with pytest.raises(ValueError, match="unknown argument 'bogus'"):
        C.cuda_group_norm_plan(dict(args, bogus=1), False, H100)


# ------------------------------------------------------------------ planner
def _gn_plan(shape, groups, dtype=torch.bfloat16, cl=False, backward=False, props=H100,
             path=0, chunks=0, aligned=True, param_grads=True):
    n, c = shape[:2]
    s = math.prod(shape[2:])
    ptr = ALIGNED if aligned else ALIGNED + 2
    args = dict(N=n, C=c, S=s, G=groups, channels_last=cl, dtype=DTYPE_CODES[dtype], x=ptr,
                mean=ALIGNED, rstd=ALIGNED, force_path=path, force_chunks=chunks)
    if backward:
        args.update(grad_y=ptr, grad_x=ptr)
        if param_grads:
            args.update(grad_weight=ALIGNED, grad_bias=ALIGNED)
    else:
        args.update(y=ptr)
    return C.cuda_group_norm_plan(args, backward, props)


@needs_build
def test_planner_path_heuristic():
    # Base 64x64 U-Net block, batch 8: 256 groups >= 132 SMs and 64K bf16 elements fit.
    p = _gn_plan((8, 512, 64, 64), 32)
    assert p["path"] == "onepass" and p["vec"] == 8 and p["workspace_bytes"] == 0
    # Batch 1: 32 CTAs would leave most SMs idle -> split: per-channel partial sums over
    # spatial chunks, enough CTAs for every SM.
    for cl in (False, True):
        p = _gn_plan((1, 512, 64, 64), 32, cl=cl)
        assert p["path"] == "split" and p["workspace_bytes"] > 0
        tiles = math.ceil((512 if not cl else 512 // p["vec"]) / p["owners_per_cta"])
        assert tiles * p["chunks"] >= H100["multiprocessors"]
    assert _gn_plan((1, 64, 128, 128), 1, cl=True)["chunks"] > 1
    # A group too large for one CTA (float32, 128 channels x 128x128) -> split.
    p = _gn_plan((16, 256, 128, 128), 2, dtype=torch.float32)
    assert p["path"] == "split"
    # The decision follows the device: 120 groups fill an A100 (108 SMs), not an H100.
    assert _gn_plan((4, 240, 32, 32), 30, props=A100)["path"] == "onepass"
    assert _gn_plan((4, 240, 32, 32), 30, props=H100)["path"] == "split"
    # Any channel count, not a whitelist: odd group sizes plan fine.
    for c, g in ((96, 32), (6, 3), (33, 11), (640, 32), (1, 1)):
        for cl in (False, True):
            assert _gn_plan((2, c, 7, 9), g, cl=cl)["path"] in ("onepass", "split")


@needs_build
def test_planner_vector_width_and_forcing():
    assert _gn_plan((2, 64, 8, 8), 8)["vec"] == 8                       # bf16: 16 bytes
    assert _gn_plan((2, 64, 8, 8), 8, dtype=torch.float32)["vec"] == 4
    assert _gn_plan((2, 64, 8, 8), 8, dtype=torch.float64)["vec"] == 2
    assert _gn_plan((2, 64, 7, 9), 8)["vec"] == 1                       # S % 8 != 0
    # Channels-last, 3 channels a group: one CTA per group cannot use 16-byte vectors,
    # the split path (whole rows of C channels) can, and is chosen for it.
    assert _gn_plan((2, 96, 7, 9), 32, cl=True, path=1)["vec"] == 1
    assert _gn_plan((64, 96, 7, 9), 32, cl=True) == _gn_plan((64, 96, 7, 9), 32, cl=True, path=2)
    assert _gn_plan((64, 96, 7, 9), 32, cl=True)["vec"] == 8
    # SR 256 block: 128 channels / 32 groups = 4 bf16 channels (8 bytes) a row -> split.
    assert _gn_plan((8, 128, 256, 256), 32, cl=True)["path"] == "split"
    assert _gn_plan((8, 512, 64, 64), 32, cl=True)["path"] == "onepass"  # 32-byte rows
    assert _gn_plan((2, 64, 8, 8), 8, aligned=False)["vec"] == 1        # misaligned pointer
    assert _gn_plan((64, 64, 8, 8), 8, path=2)["path"] == "split"
    assert _gn_plan((1, 64, 8, 8), 8, path=1)["path"] == "onepass"
    assert _gn_plan((1, 64, 32, 32), 8, path=2, chunks=5)["chunks"] == 5
    with pytest.raises(ValueError, match="one-pass path cannot hold a group"):
        _gn_plan((1, 64, 256, 256), 1, dtype=torch.float32, path=1)
    with pytest.raises(ValueError, match="num_groups must be a positive divisor"):
        _gn_plan((1, 10, 4, 4), 3)


@needs_build
def test_threshold_planner():
    args = dict(N=8, L=3 * 1024 * 1024, x=ALIGNED, out=ALIGNED, dtype=0)
    p = C.cuda_threshold_plan(args, False, H100)
    assert p["passes"] == 3 and p["vec"] == 4 and p["ctas_per_sample"] > 1
    assert p["ctas_per_sample"] * p["slice"] >= args["L"] // 4
    assert C.cuda_threshold_plan(dict(args, dtype=2), False, H100)["passes"] == 2   # half
    assert C.cuda_threshold_plan(dict(args, dtype=1), False, H100)["passes"] == 6   # double
    small = C.cuda_threshold_plan(dict(args, N=2, L=3 * 7 * 9), False, H100)
    assert small["vec"] == 1 and small["ctas_per_sample"] == 1
    samp = dict(N=2, L=3 * 64 * 64, z=ALIGNED, cond=ALIGNED, coefs=ALIGNED, out=ALIGNED, dtype=3)
    p = C.cuda_threshold_plan(dict(samp, threshold=2), True, H100)
    assert p["passes"] == 3 and p["workspace_bytes"] >= 2 * 3 * 64 * 64 * 4  # float32 x0
    assert C.cuda_threshold_plan(dict(samp, threshold=1), True, H100)["workspace_bytes"] == 0


# ------------------------------------------------------- twin: index mapping
def _element_channel(off, n_c_s, cl):
    n, c, s = n_c_s
    return off % c if cl else (off // s) % c


def _onepass_offsets(n, g, shape3, cl, plan):
    """Element offsets read by each (thread, item, j) of the one-pass CTA of (n, g),
    exactly as group_map() computes them, and the channel each thread believes it owns."""
    N, C_, S = shape3
    G = plan["G"]
    D = C_ // G
    vec, items, threads, lanes = plan["vec"], plan["items"], plan["threads"], plan["lanes"]
    tid = torch.arange(threads)[:, None]
    it = torch.arange(items)[None, :]
    if cl:
        owners = D // vec
        o, l = tid % owners, tid // owners
        active = l < lanes
        base = n * S * C_ + l * C_ + g * D + o * vec
        stride, extent = lanes * C_, S
        owned = g * D + o * vec
    else:
        owners = D
        o, l = tid // lanes, tid % lanes
        active = o < owners
        base = (n * C_ + g * D + o) * S + l * vec
        stride, extent = lanes * vec, S // vec
        owned = g * D + o
    ok = active & (l + it * lanes < extent)
    j = torch.arange(vec)
    offs = (base + it * stride)[..., None] + j                      # (threads, items, vec)
    chan = (owned[..., None] + j) if cl else owned[..., None]       # channel of each element
    mask = ok[..., None].expand_as(offs)
    return offs[mask], chan.expand_as(offs)[mask]


def _group_offsets(n, g, shape3, G, cl):
    N, C_, S = shape3
    D = C_ // G
    c = torch.arange(g * D, (g + 1) * D)[:, None]
    s = torch.arange(S)[None, :]
    off = n * S * C_ + s * C_ + c if cl else (n * C_ + c) * S + s
    return off.flatten()


TWIN_SHAPES = [  # (N, C, S), groups, dtype
    ((2, 8, 35), 4, torch.float32),
    ((1, 96, 63), 32, torch.bfloat16),
    ((2, 64, 64), 8, torch.bfloat16),
    ((3, 12, 33), 3, torch.float16),
    ((2, 256, 1024), 32, torch.bfloat16),
    ((1, 32, 4096), 32, torch.float32),
    ((2, 40, 49), 5, torch.float64),
]


@needs_build
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_twin_onepass_mapping_covers_each_group_once(cl, backward):
    for (n_, c_, s_), g_, dtype in TWIN_SHAPES:
        plan = _gn_plan((n_, c_, s_), g_, dtype=dtype, cl=cl, backward=backward, path=1)
        assert plan["path"] == "onepass"
        assert plan["threads"] % 32 == 0
        assert plan["threads"] <= (512 if backward or cl or plan["items"] > 4 else 1024)
        plan["G"] = g_
        for n in range(n_):
            for g in (0, g_ - 1):
                offs, owned = _onepass_offsets(n, g, (n_, c_, s_), cl, plan)
                want = _group_offsets(n, g, (n_, c_, s_), g_, cl)
                assert offs.numel() == want.numel(), "an element read twice or not at all"
                assert torch.equal(offs.sort().values, want.sort().values)
                assert torch.equal(owned, _element_channel(offs, (n_, c_, s_), cl)), \
                    "a thread applies another channel's parameters"


def _split_partials(shape3, cl, plan):
    """(offset, partial index) of every element the split reduction reads."""
    N, C_, S = shape3
    vec, lanes, opc, chunk, K = (plan[k] for k in ("vec", "lanes", "owners_per_cta", "chunk", "chunks"))
    tid = torch.arange(256)
    offs, parts = [], []
    if not cl:
        V = S // vec
        o_local, l = tid // lanes, tid % lanes
        for bx in range(math.ceil(N * C_ / opc)):
            row = bx * opc + o_local
            active = (o_local < opc) & (row < N * C_)
            for k in range(K):
                start, end = k * chunk, min(V, (k + 1) * chunk)
                m = torch.arange(0, max(1, math.ceil(chunk / lanes)))[None, :]
                i = start + l[:, None] + m * lanes
                ok = active[:, None] & (i < end)
                o = (row[:, None] * S + i * vec)[..., None] + torch.arange(vec)
                p = (row * K + k)[:, None, None].expand_as(o)
                mask = ok[..., None].expand_as(o)
                offs.append(o[mask])
                parts.append(p[mask])
    else:
        cv = C_ // vec
        o_local, l = tid % opc, tid // opc
        for bx in range(math.ceil(cv / opc)):
            col = bx * opc + o_local
            active = (l < lanes) & (col < cv)
            for k in range(K):
                start, end = k * chunk, min(S, (k + 1) * chunk)
                m = torch.arange(0, max(1, math.ceil(chunk / lanes)))[None, :]
                r = start + l[:, None] + m * lanes
                ok = active[:, None] & (r < end)
                for n in range(N):
                    j = torch.arange(vec)
                    o = (n * S * C_ + r * C_ + (col * vec)[:, None])[..., None] + j
                    p = ((n * K + k) * C_ + (col * vec)[:, None, None] + j).expand_as(o)
                    mask = ok[..., None].expand_as(o)
                    offs.append(o[mask])
                    parts.append(p[mask])
    return torch.cat(offs), torch.cat(parts)


@needs_build
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("chunks", [0, 3])
def test_twin_split_mapping_and_finalize_indices(cl, chunks):
    for (n_, c_, s_), g_, dtype in TWIN_SHAPES[:5]:
        plan = _gn_plan((n_, c_, s_), g_, dtype=dtype, cl=cl, path=2, chunks=chunks)
        K, D = plan["chunks"], c_ // g_
        offs, parts = _split_partials((n_, c_, s_), cl, plan)
        assert offs.numel() == n_ * c_ * s_ and torch.equal(offs.sort().values,
                                                            torch.arange(n_ * c_ * s_))
        # Every element lands in the partial of its own (n, c); all N*C*K partials exist.
        n_of = offs // (c_ * s_)
        c_of = _element_channel(offs, (n_, c_, s_), cl)
        pc = parts % c_ if cl else (parts // K) % c_
        pn = parts // (K * c_)
        assert torch.equal(pc, c_of) and torch.equal(pn, n_of)
        assert torch.equal(parts.unique(), torch.arange(n_ * c_ * K))
        # The finalize kernel of (n, g) reads exactly the partials of that group.
        for n in range(n_):
            for g in range(g_):
                i = torch.arange(D * K)
                idx = ((n * K + i // D) * c_ + g * D + i % D) if cl else ((n * c_ + g * D) * K + i)
                mine = parts[(n_of == n) & (c_of // D == g)].unique()
                assert torch.equal(idx.sort().values, mine)


@needs_build
@pytest.mark.parametrize("cl", [False, True])
def test_twin_apply_vectors_channels_and_groups(cl):
    """The apply kernels' per-vector channel (one channel contiguous, VEC consecutive
    channels channels-last) and their in-step group walk."""
    for (n_, c_, s_), g_, dtype in TWIN_SHAPES:
        vec = _gn_plan((n_, c_, s_), g_, dtype=dtype, cl=cl, path=2)["vec"]
        d = c_ // g_
        e = torch.arange(0, c_ * s_, vec)[:, None] + torch.arange(vec)
        chan = e % c_ if cl else e // s_
        c0 = chan[:, :1]
        if not cl:
            assert torch.equal(chan, c0.expand_as(chan))
            continue
        assert torch.equal(chan, c0 + torch.arange(vec))
        for row in range(0, c0.shape[0], max(1, c0.shape[0] // 7)):  # the kernel's walk
            g, r = int(c0[row]) // d, int(c0[row]) % d
            for j in range(vec):
                if j > 0:
                    r += 1
                    if r == d:
                        r, g = 0, g + 1
                assert g == int(chan[row, j]) // d


# ------------------------------------------------------- twin: the maths
def _twin_gn(x, groups, w, b, s, sh, act):
    """Forward and backward of the kernels' formulas (alpha/beta, P, Q, c2, c3) in float64."""
    n, c = x.shape[:2]
    xs = x.reshape(n, c, -1)
    D = c // groups
    xg = xs.reshape(n, groups, -1)
    mean = xg.mean(-1)
    m2 = ((xg - mean[..., None]) ** 2).sum(-1)
    rstd = 1 / torch.sqrt(m2 / xg.shape[-1] + 1e-5)
    mean_c = mean.repeat_interleave(D, 1)[..., None]
    rstd_c = rstd.repeat_interleave(D, 1)[..., None]
    wf = w[None, :] * (1 + s)
    alpha = (rstd_c[..., 0] * wf)[..., None]
    beta = (b[None, :] * (1 + s) + sh)[..., None]
    h = (xs - mean_c) * alpha + beta
    y = reference._apply_activation(h, act)
    return y.reshape(x.shape), (xs, mean_c, rstd_c, alpha, beta, wf, h, mean, rstd)


def _twin_gn_backward(gy, groups, w, b, s, act, saved):
    xs, mean_c, rstd_c, alpha, beta, wf, h, mean, rstd = saved
    from imagen_fast.ops._torch_backend import activation_grad
    n, c, S = xs.shape
    D = c // groups
    dh = gy.reshape(n, c, S) * activation_grad(h, act)
    xhat = (xs - mean_c) * rstd_c
    P, Q = dh.sum(-1), (dh * xhat).sum(-1)
    A_ = (wf * P).reshape(n, groups, D).sum(-1)
    B_ = (wf * Q).reshape(n, groups, D).sum(-1)
    M = D * S
    c2 = (-rstd * B_ / M).repeat_interleave(D, 1)[..., None]
    c3 = (-rstd * A_ / M).repeat_interleave(D, 1)[..., None]
    gx = dh * alpha + xhat * c2 + c3
    gw = ((1 + s) * Q).sum(0)
    gb = ((1 + s) * P).sum(0)
    return gx, gw, gb, w[None, :] * Q + b[None, :] * P, P


@pytest.mark.parametrize("act", ["silu", "gelu", "none"])
def test_twin_group_norm_formulas_match_reference_and_autograd(act):
    g = _gen(7)
    x = torch.randn(3, 12, 5, 7, generator=g, dtype=torch.float64) * 2 + 0.5
    w, b = torch.randn(12, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    s, sh = (torch.randn(3, 12, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    leaves = [t.clone().requires_grad_() for t in (x, w, b, s, sh)]
    ref = reference.group_norm_silu(leaves[0], 4, *leaves[1:3], 1e-5, *leaves[3:], act)
    y, saved = _twin_gn(x, 4, w, b, s, sh, act)
    torch.testing.assert_close(y, ref.detach(), rtol=1e-12, atol=1e-12)
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(ref, leaves, gy)
    got = _twin_gn_backward(gy, 4, w, b, s, act, saved)
    for name, a_, r_ in zip(("x", "weight", "bias", "scale", "shift"), got, want):
        torch.testing.assert_close(a_.reshape(r_.shape), r_, rtol=1e-10, atol=1e-10, msg=name)


def _keys(v):
    """|v|'s bit pattern as int64 keys and the key width, as Radix<T> in cuda_threshold.cuh."""
    if v.dtype == torch.float32:
        return v.view(torch.int32).to(torch.int64) & 0x7FFFFFFF, 31
    if v.dtype in (torch.float16, torch.bfloat16):
        return v.view(torch.int16).to(torch.int64) & 0x7FFF, 15
    return v.view(torch.int64) & 0x7FFFFFFFFFFFFFFF, 63


def _decode(key, dtype):
    if dtype == torch.float32:
        return torch.tensor([key], dtype=torch.int32).view(torch.float32).double().item()
    if dtype in (torch.float16, torch.bfloat16):
        return torch.tensor([key], dtype=torch.int16).view(dtype).double().item()
    return torch.tensor([key], dtype=torch.int64).view(torch.float64).item()


def _twin_radix_select(v, q):
    """The kernels' selection: digit passes from the top, two prefixes, histogram scans."""
    keys, bits = _keys(v)
    passes = (bits + 10) // 11
    widths = [bits // passes + (1 if p < bits % passes else 0) for p in range(passes)]
    L = keys.numel()
    rank = q * (L - 1)
    lo = min(max(math.floor(rank), 0), L - 1)
    hi = min(lo + 1, L - 1)
    prefix, k = [0, 0], [lo, hi]
    top = bits
    for p in range(passes):
        shift = top - widths[p]
        hs = top
        split = prefix[0] != prefix[1]
        hist = []
        for t in range(2):
            pre = prefix[t] if (t == 0 or split) else prefix[0]
            match = (keys >> hs) == (pre >> hs)
            digits = (keys[match] >> shift) & ((1 << widths[p]) - 1)
            hist.append(torch.bincount(digits, minlength=1 << widths[p]))
        for t in range(2):
            h = hist[t] if split else hist[0]
            cum = torch.cumsum(h, 0)
            d = int(torch.searchsorted(cum, torch.tensor(k[t]), right=True))
            k[t] -= int(cum[d - 1]) if d > 0 else 0
            prefix[t] |= d << shift
        top = shift
    below, above = _decode(prefix[0], v.dtype), _decode(prefix[1], v.dtype)
    return below + (above - below) * (rank - lo)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_twin_radix_select_equals_quantile(dtype):
    g = _gen(11)
    cases = [
        torch.randn(1000, generator=g, dtype=torch.float64) * 2.5,
        torch.randint(-6, 7, (300,), generator=g).double() / 2,          # heavy ties
        torch.zeros(17, dtype=torch.float64),
        torch.tensor([-3.0], dtype=torch.float64),                        # L = 1
        torch.cat([torch.full((50,), 1e-4), torch.full((3,), -3e4)]).double(),  # wide range
    ]
    for v in cases:
        v = v.to(dtype)
        vals = v.abs().double()
        for q in (0.0, 0.5, 0.9, 0.995, 1.0):
            want = reference.quantile_linear(vals[None, :], q).item()
            assert _twin_radix_select(v, q) == want, (dtype, q, v.numel())


# ===================================================== emulated kernels (no GPU)
# The source tree the emulation compiles (overridable to check that these tests catch
# deliberately broken copies of the kernels).
REPO = Path(os.environ.get("IMAGEN_FAST_EMULATION_ROOT", Path(__file__).resolve().parents[2]))
EMU_FLAGS = ["-std=c++17", "-O1", "-fPIC", "-ffp-contract=off", "-DIMAGEN_FAST_CUDA_EMULATION",
             "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas"]


@functools.lru_cache(maxsize=None)
def build_emulator():
    """(module, "") with csrc/cuda compiled for the host emulation, or (None, why not).
    Cached under build/cuda_emulation/<hash of the sources and flags>."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        return None, "no C++ compiler"
    try:
        import pybind11
    except ImportError:
        return None, "pybind11 not installed"
    cu = sorted(p for p in (REPO / "csrc/cuda").glob("*.cu") if p.name != "runtime.cu")
    cpp = [REPO / "csrc/cuda/bindings.cpp", *sorted((REPO / "csrc/cuda/emulation").glob("*.cpp"))]
    flags = EMU_FLAGS + [f"-I{REPO / 'csrc/include'}", f"-I{pybind11.get_include()}",
                         f"-I{sysconfig.get_paths()['include']}"]
    h = hashlib.sha256(" ".join([cxx] + EMU_FLAGS).encode())
    for f in cu + cpp + sorted((REPO / "csrc/include/imagen_fast").glob("*")):
        h.update(f.name.encode() + f.read_bytes())
    out = REPO / "build" / "cuda_emulation" / h.hexdigest()[:16]
    so = out / ("imagen_fast_cuda_emu" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not so.exists():
        out.mkdir(parents=True, exist_ok=True)

        def compile_one(src):
            obj = out / f"{src.stem}.{os.getpid()}.o"
            lang = ["-x", "c++"] if src.suffix == ".cu" else []
            r = subprocess.run([cxx, *flags, "-c", *lang, str(src), "-o", str(obj)],
                               capture_output=True, text=True)
            return obj, r
        with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as ex:
            built = list(ex.map(compile_one, cu + cpp))
        for obj, r in built:
            if r.returncode != 0:
                raise RuntimeError(f"emulation build failed for {obj.name}:\n{r.stderr[-4000:]}")
            if "warning" in r.stderr:  # reported, not fatal: warnings vary between compilers
                warnings.warn(f"emulation build warns for {obj.name}:\n{r.stderr[-2000:]}")
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        r = subprocess.run([cxx, "-shared", *[str(o) for o, _ in built], "-o", str(tmp)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"emulation link failed:\n{r.stderr[-4000:]}")
        os.replace(tmp, so)
        for o, _ in built:
            o.unlink()
    spec = importlib.util.spec_from_file_location("imagen_fast_cuda_emu", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, ""


def _emulated_backend(emu):
    """A private copy of imagen_fast.kernels.cuda driving the emulated module (never
    registered with the dispatcher, so the real backend list is untouched)."""
    import imagen_fast._compiled as compiled
    from imagen_fast.kernels import registry
    src = REPO / "imagen_fast/kernels/cuda.py"
    spec = importlib.util.spec_from_file_location("imagen_fast.kernels._cuda_emulated", src)
    mod = importlib.util.module_from_spec(spec)
    saved = compiled.load_extension, registry.register
    compiled.load_extension = lambda: emu
    registry.register = lambda *a, **k: (lambda f: f)
    try:
        spec.loader.exec_module(mod)
    finally:
        compiled.load_extension, registry.register = saved
    mod._EMULATED = True
    return mod


@pytest.fixture(scope="module")
def emu():
    mod, why = build_emulator()
    if mod is None:
        pytest.skip(f"CUDA emulation not built: {why}")
    return mod


class Guarded:
    """Every tensor allocated in a guard zone: 4 KiB of 0xFF bytes (NaN for floats) on both
    sides. An out-of-bounds read brings NaN into the results; an out-of-bounds write
    changes a guard byte, which check() reports. The tensor's own bytes start as 0xFF too
    (NaN poison: an unwritten output or workspace element shows)."""

    PAD = 4096

    def __init__(self):
        self.zones = []

    def empty_strided(self, size, stride, dtype):
        size, stride = tuple(size), tuple(stride)
        elems = 1 + sum((n - 1) * st for n, st in zip(size, stride)) if all(size) else 0
        nbytes = elems * dtype.itemsize
        base = torch.full((nbytes + 2 * self.PAD,), 0xFF, dtype=torch.uint8)
        body = base[self.PAD:self.PAD + nbytes].view(dtype)
        self.zones.append((base, nbytes))
        return body.as_strided(size, stride)

    def wrap(self, t):
        """A guarded copy of t with t's strides."""
        if t is None:
            return None
        out = self.empty_strided(t.shape, t.stride(), t.dtype)
        out.copy_(t)
        return out

    def check(self):
        for base, nbytes in self.zones:
            head, tail = base[:self.PAD], base[self.PAD + nbytes:]
            assert bool((head == 0xFF).all()) and bool((tail == 0xFF).all()), \
                f"out-of-bounds write next to a {nbytes}-byte tensor"


@pytest.fixture
def guarded(monkeypatch):
    g = Guarded()
    real_empty = torch.empty

    def empty(*size, dtype=None, device=None, **kw):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        dtype = dtype or torch.get_default_dtype()
        if device is not None and torch.device(device).type != "cpu":
            return real_empty(*size, dtype=dtype, device=device, **kw)
        stride, acc = [], 1
        for n in reversed(size):
            stride.insert(0, acc)
            acc *= max(int(n), 1)
        return g.empty_strided(size, stride, dtype)

    def empty_like(t, dtype=None, **kw):
        return g.empty_strided(t.shape, t.stride(), dtype or t.dtype)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield g
    g.check()


@pytest.fixture
def cb_emu(emu, monkeypatch, guarded):
    """The cuda backend's functions on CPU tensors through the emulation, every
    allocation (outputs, statistics, workspace) guarded and NaN-poisoned."""
    cb = _emulated_backend(emu)
    emu.set_device_props(132, 2048)
    for var in ("IMAGEN_FAST_CUDA_GN_PATH", "IMAGEN_FAST_CUDA_GN_CHUNKS",
                "IMAGEN_FAST_CUDA_THRESHOLD_CTAS"):
        monkeypatch.delenv(var, raising=False)
    return cb


EMU_GN_CASES = [((2, 8, 5, 7), 4), ((1, 96, 7, 9), 32), ((3, 12, 11), 3), ((2, 8, 3, 4, 5), 2),
                ((2, 32, 8, 8), 4), ((1, 6, 4, 4), 3)]
EMU_PATHS = [("onepass", 0), ("split", 0), ("split", 3)]


def _sdt(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gn_ref_inputs(shape, dtype, seed, film, affine):
    x, w, b, s, sh = _gn_inputs(shape, dtype, seed, film=film, affine=affine)
    sdt = _sdt(dtype)
    return x, *[None if t is None else t.to(sdt) for t in (w, b, s, sh)]


def test_emulation_builds_and_reports(emu):
    assert emu.EMULATED and emu.cuda_device_count() == 1
    with pytest.raises(ValueError, match="one-pass path cannot hold a group"):
        emu.cuda_group_norm_plan(dict(N=1, C=64, S=65536, G=1, x=ALIGNED, y=ALIGNED, mean=ALIGNED,
                                      rstd=ALIGNED, force_path=1), False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("path,chunks", EMU_PATHS)
def test_emulated_group_norm_forward(cb_emu, guarded, monkeypatch, dtype, channels_last, path,
                                     chunks):
    monkeypatch.setenv("IMAGEN_FAST_CUDA_GN_PATH", path)
    monkeypatch.setenv("IMAGEN_FAST_CUDA_GN_CHUNKS", str(chunks))
    variants = [(True, True, "silu"), (False, False, "gelu"), (True, False, "none"),
                (False, True, "none")]
    for i, (shape, groups) in enumerate(EMU_GN_CASES):
        if channels_last and len(shape) < 4:
            continue
        film, affine, act = variants[i % len(variants)]
        x, w, b, s, sh = _gn_ref_inputs(shape, dtype, 100 + i, film, affine)
        xd = guarded.wrap(_cl(x) if channels_last else x)
        assert cb_emu.group_norm_plan(xd, groups)["path"] == path
        y, mean, rstd = cb_emu.group_norm_silu_fwd(xd, groups, *map(guarded.wrap, (w, b)), 1e-5,
                                                   *map(guarded.wrap, (s, sh)), act)
        assert y.dtype == dtype and y.shape == x.shape and y.stride() == xd.stride()
        d = lambda t: None if t is None else t.double()  # noqa: E731
        ref = reference.group_norm_silu(x.double(), groups, d(w), d(b), 1e-5, d(s), d(sh), act)
        lp = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        same = reference.group_norm_silu(x, groups, lp(w), lp(b), 1e-5, lp(s), lp(sh), act)
        assert_close_to_reference(y, ref, same, what=f"{path}/{chunks} y {shape} {act}")
        rmean, rrstd = reference.group_norm_stats(x.double(), groups, 1e-5)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(mean.double(), rmean, rtol=tol, atol=tol)
        torch.testing.assert_close(rstd.double(), rrstd, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("path,chunks", EMU_PATHS)
@pytest.mark.parametrize("activation", ["silu", "gelu", "none"])
def test_emulated_group_norm_backward(cb_emu, guarded, monkeypatch, dtype, channels_last, path,
                                      chunks, activation):
    monkeypatch.setenv("IMAGEN_FAST_CUDA_GN_PATH", path)
    monkeypatch.setenv("IMAGEN_FAST_CUDA_GN_CHUNKS", str(chunks))
    for i, (shape, groups) in enumerate((((2, 8, 5, 7), 4), ((2, 96, 7, 9), 32),
                                         ((2, 32, 8, 8), 4))):
        x, w, b, s, sh = _gn_ref_inputs(shape, dtype, 200 + i, True, True)
        xd = guarded.wrap(_cl(x) if channels_last else x)
        wg, bg, sg, shg = map(guarded.wrap, (w, b, s, sh))
        _, mean, rstd = cb_emu.group_norm_silu_fwd(xd, groups, wg, bg, 1e-5, sg, shg, activation)
        gy = randn(*shape, dtype=dtype, generator=_gen(300 + i))
        gy_l = guarded.wrap(_cl(gy) if channels_last else gy)
        needs = (True, True, True, True, True) if i != 1 else (True, False, True, True, False)
        got = cb_emu.group_norm_silu_bwd(gy_l, xd, mean, rstd, groups, wg, bg, sg, shg,
                                         activation, needs)
        assert len(got) == 5 and all((g is None) == (not n) for g, n in zip(got, needs))
        assert got[0].stride() == xd.stride()
        act = None if activation == "none" else activation
        r_leaves = [t.double().requires_grad_() for t in (x, w, b, s, sh)]
        ref = reference.group_norm_silu(r_leaves[0], groups, *r_leaves[1:3], 1e-5,
                                        *r_leaves[3:], act)
        r_grads = torch.autograd.grad(ref, r_leaves, gy.double())
        l_leaves = [t.to(dtype).requires_grad_() for t in (x, w, b, s, sh)]
        lp = reference.group_norm_silu(l_leaves[0], groups, *l_leaves[1:3], 1e-5, *l_leaves[3:],
                                       act)
        l_grads = torch.autograd.grad(lp, l_leaves, gy)
        for name, g_, r_, t_ in zip(("x", "weight", "bias", "scale", "shift"), got, r_grads,
                                    l_grads):
            if g_ is None:
                continue
            floor = None if name == "x" else 1e-4 * math.sqrt(x.numel()) * r_.abs().max().item()
            if dtype == torch.float64:
                floor = 1e-9 * max(1.0, r_.abs().max().item())
            assert_close_to_reference(g_, r_, t_, what=f"{path}/{chunks} grad {name} {shape}",
                                      floor=floor)


@pytest.mark.parametrize("sms", [4, 132, 1000])
def test_emulated_group_norm_automatic_path(cb_emu, emu, sms):
    """The heuristic's choice depends on the device; every choice gives the right answer."""
    emu.set_device_props(sms, 2048)
    for i, (shape, groups) in enumerate(EMU_GN_CASES[:3]):
        x, w, b, s, sh = _gn_ref_inputs(shape, torch.float32, 400 + i, True, True)
        n = shape[0]
        want = "onepass" if n * groups >= sms else "split"
        assert cb_emu.group_norm_plan(x, groups)["path"] == want
        y, _, _ = cb_emu.group_norm_silu_fwd(x, groups, w, b, 1e-5, s, sh, "silu")
        ref = reference.group_norm_silu(x.double(), groups, w.double(), b.double(), 1e-5,
                                        s.double(), sh.double())
        assert_close_to_reference(y, ref)


def _thr_inputs(seed):
    g = _gen(seed)
    ties = (torch.randint(-6, 7, (4, 3, 6, 5), generator=g).double() / 2)
    return [randn(3, 3, 8, 8, generator=g, dtype=torch.float64) * 2.5,
            randn(1, 3, 7, 9, generator=g, dtype=torch.float64) * 0.3,
            randn(2, 4, 33, generator=g, dtype=torch.float64) * 3, ties,
            _cl(randn(2, 8, 4, 4, generator=g, dtype=torch.float64))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("ctas", [0, 3])
def test_emulated_dynamic_threshold(cb_emu, guarded, monkeypatch, dtype, ctas):
    monkeypatch.setenv("IMAGEN_FAST_CUDA_THRESHOLD_CTAS", str(ctas))
    for x in _thr_inputs(500):
        x = guarded.wrap(x.to(dtype))
        for q in (0.0, 0.5, 0.9, 0.995, 1.0):
            y, s = cb_emu.threshold_values(x, q, 1.0)
            assert y.dtype == dtype and y.stride() == x.stride()
            flat = x.abs().double().reshape(x.shape[0], -1)
            want = reference.quantile_linear(flat, q).clamp(min=1.0)
            assert torch.equal(s, want), (tuple(x.shape), q)
            ref = reference.dynamic_threshold(x.double(), q, 1.0)
            assert_close_to_reference(y, ref, ref.to(dtype), what=f"y {tuple(x.shape)} q={q}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("threshold", ["dynamic", "static", "none"])
@pytest.mark.parametrize("guided,noisy", [(True, True), (False, True), (True, False)])
def test_emulated_sampler_step(cb_emu, guarded, dtype, threshold, guided, noisy):
    g = _gen(600)
    for shape in ((3, 3, 5, 7), (3, 4, 8, 8)):
        z, cond, uncond, noise = (randn(*shape, dtype=dtype, generator=g) for _ in range(4))
        alpha_t = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
        alpha_s = torch.tensor([0.5, 0.8, 1.0], dtype=torch.float64)
        coefs = ops.step_coefficients(alpha_t, (1 - alpha_t ** 2).sqrt(), alpha_s,
                                      (1 - alpha_s ** 2).sqrt())
        u = uncond if guided else None
        e = noise if noisy else None
        for layout in (lambda t: t, _cl):
            lg = lambda t: None if t is None else guarded.wrap(layout(t))  # noqa: E731
            out = cb_emu.sampler_step(lg(z), lg(cond), lg(u), 5.0, guarded.wrap(coefs), lg(e),
                                      threshold, 0.95, 1.0)
            assert out.dtype == dtype and out.stride() == layout(z).stride()
            d = lambda t: None if t is None else t.double()  # noqa: E731
            ref = reference.sampler_step(d(z), d(cond), d(u), 5.0, coefs, d(e), threshold, 0.95,
                                         1.0)
            f = lambda t: None if t is None else t.to(_sdt(dtype))  # noqa: E731
            same = reference.sampler_step(f(z), f(cond), f(u), 5.0, coefs, f(e), threshold,
                                          0.95, 1.0).to(dtype)
            assert_close_to_reference(out, ref, same, what=f"z_s {threshold} {shape}")


# ================================================================== on a GPU
GPU_GN_SHAPES = [((2, 8, 5, 7), 4), ((1, 96, 7, 9), 32), ((2, 64, 16, 16), 8),
                 ((3, 12, 11), 3), ((2, 8, 3, 4, 5), 2), ((1, 32, 32, 32), 8)]


def _gn_inputs(shape, dtype, seed, film=True, affine=True):
    return group_norm_inputs(shape, dtype, film, affine, seed)


def _cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


@pytest.fixture
def gn_path(monkeypatch):
    def set_path(path, chunks=0):
        monkeypatch.setenv("IMAGEN_FAST_CUDA_GN_PATH", path)
        monkeypatch.setenv("IMAGEN_FAST_CUDA_GN_CHUNKS", str(chunks))
    return set_path


@pytest.mark.gpu
@needs_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("path,chunks", [("onepass", 0), ("split", 0), ("split", 3), ("split", 7)])
def test_gpu_group_norm_paths_forward(gn_path, dtype, channels_last, path, chunks):
    from imagen_fast.kernels import cuda as cb
    gn_path(path, chunks)
    for shape, groups in GPU_GN_SHAPES:
        if channels_last and len(shape) < 4:
            continue
        x, w, b, s, sh = _gn_inputs(shape, dtype, seed=3)
        xd = _cl(x.cuda()) if channels_last else x.cuda()
        assert cb.group_norm_plan(xd, groups)["path"] == path
        with ops.use_backend("cuda"):
            y = ops.group_norm_silu(xd, groups, *_cuda(w, b), scale=s.cuda(), shift=sh.cuda())
        assert ops.is_channels_last(y) == ops.is_channels_last(xd)
        d = lambda t: t.double()  # noqa: E731
        ref = reference.group_norm_silu(d(x), groups, d(w), d(b), 1e-5, d(s), d(sh), "silu")
        lp = lambda t: t.to(dtype)  # noqa: E731
        same = reference.group_norm_silu(x, groups, lp(w), lp(b), 1e-5, lp(s), lp(sh), "silu")
        assert_close_to_reference(y.cpu(), ref, same, what=f"{path}/{chunks} y {shape}")


@pytest.mark.gpu
@needs_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("path,chunks", [("onepass", 0), ("split", 0), ("split", 5)])
@pytest.mark.parametrize("activation", ["silu", "gelu", None])
def test_gpu_group_norm_paths_backward(gn_path, dtype, channels_last, path, chunks, activation):
    gn_path(path, chunks)
    for shape, groups in (((2, 8, 5, 7), 4), ((2, 96, 7, 9), 32), ((2, 64, 16, 16), 8)):
        x, w, b, s, sh = _gn_inputs(shape, dtype, seed=5)
        leaves = [t.cuda().requires_grad_() for t in (x, w, b, s, sh)]
        xd = _cl(leaves[0]) if channels_last else leaves[0]
        with ops.use_backend("cuda"):
            y = ops.group_norm_silu(xd, groups, leaves[1], leaves[2], scale=leaves[3],
                                    shift=leaves[4], activation=activation)
        gy = randn(*shape, dtype=dtype, generator=_gen(9))
        grads = torch.autograd.grad(y, leaves, gy.cuda())
        r_leaves = [t.double().requires_grad_() for t in (x, w, b, s, sh)]
        ref = reference.group_norm_silu(r_leaves[0], groups, *r_leaves[1:3], 1e-5,
                                        *r_leaves[3:], activation)
        r_grads = torch.autograd.grad(ref, r_leaves, gy.double())
        l_leaves = [t.to(dtype).requires_grad_() for t in (x, w, b, s, sh)]
        lp = reference.group_norm_silu(l_leaves[0], groups, *l_leaves[1:3], 1e-5, *l_leaves[3:],
                                       activation)
        l_grads = torch.autograd.grad(lp, l_leaves, gy)
        for name, g_, r_, t_ in zip(("x", "weight", "bias", "scale", "shift"), grads, r_grads,
                                    l_grads):
            floor = None if name == "x" else 1e-4 * math.sqrt(x.numel()) * r_.abs().max().item()
            assert_close_to_reference(g_.cpu(), r_, t_, what=f"{path} grad {name} {shape}",
                                      floor=floor)


@pytest.mark.gpu
@needs_build
@pytest.mark.parametrize("path", ["onepass", "split"])
def test_gpu_group_norm_bit_for_bit_deterministic(gn_path, path):
    gn_path(path, 4 if path == "split" else 0)
    x, w, b, s, sh = _cuda(*_gn_inputs((2, 64, 24, 24), torch.bfloat16, seed=13))
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, s, sh)]
        with ops.use_backend("cuda"):
            y = ops.group_norm_silu(_cl(leaves[0]), 8, leaves[1], leaves[2], scale=leaves[3],
                                    shift=leaves[4])
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
        runs.append([y.detach(), *grads])
    for a_, b_ in zip(*runs):
        assert torch.equal(a_, b_)


@pytest.mark.gpu
@needs_build
def test_gpu_group_norm_on_a_side_stream():
    x, w, b, s, sh = _cuda(*_gn_inputs((4, 32, 16, 16), torch.float32, seed=17))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), ops.use_backend("cuda"):
        y = ops.group_norm_silu(x, 8, w, b, scale=s, shift=sh)
    torch.cuda.current_stream().wait_stream(stream)
    ref = reference.group_norm_silu(x.cpu().double(), 8, w.cpu().double(), b.cpu().double(), 1e-5,
                                    s.cpu().double(), sh.cpu().double())
    assert_close_to_reference(y.cpu(), ref)


@pytest.mark.gpu
@needs_build
def test_gpu_group_norm_torch_compile_fullgraph():
    x, w, b, s, sh = _cuda(*_gn_inputs((2, 16, 8, 8), torch.float32, seed=19))
    fn = torch.compile(lambda a: ops.dynamic_threshold(ops.group_norm_silu(a, 4, w, b, scale=s,
                                                                          shift=sh), 0.9),
                       fullgraph=True)
    with ops.use_backend("cuda"):
        got = fn(x)
        want = ops.dynamic_threshold(ops.group_norm_silu(x, 4, w, b, scale=s, shift=sh), 0.9)
    assert torch.equal(got, want)


@pytest.mark.gpu
@needs_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("ctas", [0, 1, 5])
def test_gpu_threshold_values_are_exact_order_statistics(monkeypatch, dtype, ctas):
    from imagen_fast.kernels import cuda as cb
    monkeypatch.setenv("IMAGEN_FAST_CUDA_THRESHOLD_CTAS", str(ctas))
    g = _gen(23)
    for shape in ((3, 3, 8, 8), (1, 3, 7, 9), (2, 4, 33), (2, 3, 64, 64)):
        x = (randn(*shape, generator=g, dtype=torch.float64) * 2.5).to(dtype)
        x[0, 0, :3] = 0.0                                   # ties at zero
        for q in (0.0, 0.5, 0.995, 1.0):
            y, s = cb.threshold_values(x.cuda(), q, 1e-6)
            want = reference.quantile_linear(x.abs().double().reshape(shape[0], -1), q)
            assert torch.equal(s.cpu(), want.clamp(min=1e-6)), (shape, q)
            ref = reference.dynamic_threshold(x.double(), q, 1e-6)
            assert_close_to_reference(y.cpu(), ref, ref.to(dtype), what=f"y {shape} q={q}")


@pytest.mark.gpu
@needs_build
@not_under_sanitizer
def test_gpu_threshold_8x3x1024x1024():
    from imagen_fast.kernels import cuda as cb
    x = randn(8, 3, 1024, 1024, generator=_gen(29), scale=2.0)
    y, s = cb.threshold_values(x.cuda(), 0.995, 1.0)
    flat = x.reshape(8, -1).abs().double()
    want = reference.quantile_linear(flat, 0.995).clamp(min=1.0)
    assert torch.equal(s.cpu(), want)
    ref = x.double().clamp(-want.reshape(-1, 1, 1, 1), want.reshape(-1, 1, 1, 1)) / want.reshape(-1, 1, 1, 1)
    assert_close_to_reference(y.cpu(), ref, floor=1e-6)
    y2, s2 = cb.threshold_values(x.cuda(), 0.995, 1.0)
    assert torch.equal(y, y2) and torch.equal(s, s2)


@pytest.mark.gpu
@needs_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threshold", ["dynamic", "static", "none"])
def test_gpu_sampler_step(dtype, threshold):
    n = 4
    shape = (n, 3, 64, 64)
    g = _gen(31)
    z, cond, uncond, noise = (randn(*shape, dtype=dtype, generator=g) for _ in range(4))
    alpha_t = torch.tensor([0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    alpha_s = torch.tensor([0.5, 0.6, 0.8, 1.0], dtype=torch.float64)
    kw = dict(guidance_scale=4.0, alpha_t=alpha_t, sigma_t=(1 - alpha_t ** 2).sqrt(),
              alpha_s=alpha_s, sigma_s=(1 - alpha_s ** 2).sqrt(), threshold=threshold,
              percentile=0.99)
    for layout in (lambda t: t, _cl):
        with ops.use_backend("cuda"):
            out = ops.sampler_step(*[layout(t.cuda()) for t in (z, cond, uncond)],
                                   noise=layout(noise.cuda()), **kw)
            again = ops.sampler_step(*[layout(t.cuda()) for t in (z, cond, uncond)],
                                     noise=layout(noise.cuda()), **kw)
        assert torch.equal(out, again)
        coefs = ops.step_coefficients(kw["alpha_t"], kw["sigma_t"], alpha_s, kw["sigma_s"])
        d = lambda t: t.double()  # noqa: E731
        ref = reference.sampler_step(d(z), d(cond), d(uncond), 4.0, coefs, d(noise), threshold,
                                     0.99, 1.0)
        up = lambda t: t.float()  # noqa: E731
        same = reference.sampler_step(up(z), up(cond), up(uncond), 4.0, coefs, up(noise),
                                      threshold, 0.99, 1.0).to(dtype)
        assert_close_to_reference(out.cpu(), ref, same, what=f"z_s {threshold}")
