"""Every op of imagen_fast.ops over the Imagen shape table, forward and forward+backward,
against PyTorch eager, torch.compile of the reference and the peers that are importable,
on a CPU or a CUDA GPU with the same harness.

    imagen-fast bench ops [--quick] [--device cuda] [--out DIR]        (or:)
    python -m imagen_fast.bench.bench_ops [--device cpu|cuda] [--quick] [--ops gn,attn,thr,step]
                                   [--budget-s S] [--no-compile | --compile-limit N]
                                   [--resume] [--out NAME] [--results-dir DIR]

Shapes come from imagen_fast/bench/shapes.py (recorded from the presets): for group_norm_silu the
call moving the most bytes at every stage (resolution) of every preset (channel_rms_norm_silu,
the norm of imagen-pytorch's U-Nets that imagen_fast.accelerate fuses, at the same tensors),
for attention every distinct call at text lengths 64/128/256 (with and without the key
padding mask), for thresholding and the sampler step each preset's output image; plus a
batch sweep 1/8/64 at one shape per op.
A CPU runs the small presets at batch 8 and the paper presets at batch 1 (calls up to
2^24 elements); a GPU runs every preset at batch 8.

Candidates, all timed in one process, interleaved round by round (imagen_fast/bench/harness.py):
  imagen-fast     ops.* with the automatic backend choice
  triton, cuda    (GPU) the two kernel backends forced; "cuda onepass"/"cuda split"
                  force the CUDA GroupNorm paths. Their timings write the triton/cuda
                  choice table (the package's gpu_choice.json with this GPU's entries
                  merged in) to --choice-table, default <results-dir>/gpu_choice.json;
                  IMAGEN_FAST_GPU_CHOICE=<that file> makes ops/gpu_choice.py read it.
  eager           stock PyTorch (F.group_norm + FiLM + F.silu; imagen-pytorch's
                  ChanRMSNorm + FiLM + F.silu; reference attention; torch.quantile
                  thresholding), imagen_fast/bench/baselines.py
  compile         torch.compile of the reference, static shapes, compiled per shape
  sdpa*           F.scaled_dot_product_attention with the same boolean mask: the default
                  pick and each backend forced (math, efficient, flash, cudnn) where it runs
  apex            (GPU) apex.contrib.group_norm (NHWC, 16-bit) + eager FiLM/SiLU, if installed
Timing: CUDA events on a GPU, wall clock on a CPU; inputs rotated over copies larger
than the caches; medians with 10th/90th percentiles in the JSON.

Counted (the minimum any implementation moves; next to every table):
  group_norm_silu fwd      bytes = read x + write y                         2 numel size
  group_norm_silu fwd+bwd  fwd, then read x, dy; write dx                   5 numel size
  channel_rms_norm_silu    the same as group_norm_silu
  attention fwd            FLOPs = 4 B H Lq Lk D (QK^T and PV, every key counted)
  attention fwd+bwd        FLOPs = 3.5 x fwd (2 forward matmuls + 5 backward)
  dynamic_threshold        bytes = read x0 + write out                      2 numel size
  sampler_step             bytes = read z, cond, uncond, noise; write z_s   5 numel size
"fraction of copy" divides GB/s by dst.copy_(src) bandwidth (read + write) and
"fraction of matmul" divides FLOP/s by an n^3 matmul's rate in the same dtype, both
measured by this process at start.

Results: <results-dir>/<out>.json (machine, tables, raw timings), .md, .png; the
results-dir is ./bench-results unless named (the repository's committed results:
--results-dir benchmarks/results).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from imagen_fast import ops
from imagen_fast.bench import harness
from imagen_fast.bench import shapes as shape_table
from imagen_fast.bench.baselines import (
    STEP,
    eager_chan_rms_norm,
    eager_group_norm,
    eager_sampler_step,
    quantile_threshold,
)
from imagen_fast.ops import gpu_choice, reference

OPS = ("gn", "rms", "attn", "thr", "step")
SMALL_PRESETS = ("base64-small-efficient", "base64-small")
PAPER_PRESETS = ("base64", "sr256", "sr1024")
# size caps per device: tensor elements, and attention score-matrix elements (B H Lq Lk)
CPU_MAX_NUMEL, CPU_MAX_SCORES = 1 << 24, 1 << 26
GPU_MAX_NUMEL, GPU_MAX_SCORES = 1 << 28, 1 << 32
USER_GN_SHAPE = (8, 256, 32, 32)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class Case:
    op: str                      # gn | attn | thr | step
    mode: str                    # fwd | fwd+bwd
    shape: Tuple[int, ...]
    dtype: torch.dtype
    layout: str                  # NCHW | NHWC | BHLD
    source: str                  # where the shape comes from
    groups: int = 32
    film: bool = True
    text_len: int = 0
    masked: bool = False

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def size_ok(self, max_numel: int, max_scores: int) -> bool:
        if self.op == "attn":
            b, h, lq, lk, _ = self.shape
            return b * h * lq * lk <= max_scores
        return self.numel <= max_numel

    def label(self) -> str:
        return f"{self.op} {self.mode} {'x'.join(map(str, self.shape))} {DTYPE_NAMES[self.dtype]} {self.layout}"


# ----------------------------------------------------------------- the case list
def _presets_for(device: torch.device, presets: Optional[List[str]]):
    """(preset, batch): a CPU runs the paper presets at batch 1, everything else at 8."""
    if not presets:
        presets = (list(SMALL_PRESETS) + list(PAPER_PRESETS) if device.type == "cpu"
                   else list(PAPER_PRESETS) + list(SMALL_PRESETS))
    return [(p, 1 if p in PAPER_PRESETS and device.type == "cpu" else 8) for p in presets]


def build_cases(device: torch.device, quick: bool, which, presets=None) -> List[Case]:
    """The benchmark list, most important first: every rank-0 case (each preset's
    stages in the model's own dtype and layout, masked attention) before any rank-1
    case (other layouts and dtypes, more text lengths, no mask, the batch sweep), and
    within a rank round-robin over the ops, so a time budget cuts breadth, not an op."""
    cpu = device.type == "cpu"
    caps = (CPU_MAX_NUMEL, CPU_MAX_SCORES) if cpu else (GPU_MAX_NUMEL, GPU_MAX_SCORES)
    chosen = _presets_for(device, presets)[:1 if quick else None]
    main = torch.float32 if cpu else torch.bfloat16
    if cpu:          # (dtype, layout) per rank; the paper presets only at rank 0 on a CPU
        gn_variants = [(torch.float32, "NHWC"), (torch.bfloat16, "NHWC"), (torch.float32, "NCHW"),
                       (torch.bfloat16, "NCHW")]
    else:
        gn_variants = [(torch.bfloat16, "NHWC"), (torch.bfloat16, "NCHW"), (torch.float16, "NHWC"),
                       (torch.float32, "NHWC")]
    text_lens = (64,) if quick else (shape_table.TEXT_LENS[0], shape_table.TEXT_LENS[-1])
    ranked: Dict[Tuple[int, str], List[Case]] = {}
    seen = set()

    def add(rank: int, case: Case):
        key = (case.op, case.mode, case.shape, case.dtype, case.layout, case.masked, case.groups, case.film)
        if case.size_ok(*caps) and key not in seen:
            seen.add(key)
            ranked.setdefault((rank, case.op), []).append(case)

    for preset, batch in chosen:
        paper_on_cpu = cpu and preset in PAPER_PRESETS
        levels = shape_table.stage_calls(preset)
        for rank, (dt, layout) in enumerate(gn_variants[:1] if (quick or paper_on_cpu) else gn_variants):
            for call in levels[1:3] if quick else levels:
                c = call.at_batch(batch)
                for mode in ("fwd", "fwd+bwd"):
                    add(min(rank, 1), Case("gn", mode, c.shape, dt, layout, f"{preset} {c.h}px",
                                           groups=c.groups, film=c.film))
                    add(min(rank, 1), Case("rms", mode, c.shape, dt, layout, f"{preset} {c.h}px",
                                           groups=1, film=c.film))
        for tl in text_lens[:1] if paper_on_cpu else text_lens:
            calls = shape_table.attn_shapes([preset], (tl,))
            if quick:
                calls = [a for a in calls if a.kind == "self+text"][:1]
            for call in calls:
                if call.kind == "pool" and tl != text_lens[0]:
                    continue
                a = call.at_batch(batch)
                first = tl == text_lens[0]
                for masked in (True, False) if (first and not quick and not paper_on_cpu) else (True,):
                    for mode in ("fwd", "fwd+bwd"):
                        add(0 if (first and masked) else 1,
                            Case("attn", mode, a.shape, main, "BHLD", f"{preset} {a.kind}",
                                 text_len=a.text_len, masked=masked and a.masked))
        img = shape_table.image_shape(preset).at_batch(8)
        for op in ("thr", "step"):
            add(0, Case(op, "fwd", img.shape, torch.float32, "NCHW", f"{preset} output"))
            if not cpu and not quick:
                add(1, Case(op, "fwd", img.shape, torch.bfloat16, "NCHW", f"{preset} output"))
    if cpu and not quick:   # a user's call (issue 21): a diffusers-style block, NCHW float32, w and b
        for mode in ("fwd", "fwd+bwd"):
            add(0, Case("gn", mode, USER_GN_SHAPE, torch.float32, "NCHW", "user block (w, b; no FiLM)",
                        groups=32, film=False))
    if not quick:                       # the batch sweep, at the first preset's third stage
        preset = chosen[0][0]
        call = shape_table.stage_calls(preset)[2]
        attn = [a for a in shape_table.attn_shapes([preset], (64,)) if a.kind == "self+text"]
        for batch in shape_table.BATCHES:
            c = call.at_batch(batch)
            for mode in ("fwd", "fwd+bwd"):
                add(1, Case("gn", mode, c.shape, gn_variants[0][0], "NHWC",
                            f"{preset} {c.h}px batch {batch}", groups=c.groups, film=c.film))
                if attn:
                    a = attn[0].at_batch(batch)
                    add(1, Case("attn", mode, a.shape, main, "BHLD", f"{preset} {a.kind} batch {batch}",
                                text_len=a.text_len, masked=True))
            for op in ("thr", "step"):
                img = shape_table.image_shape(preset).at_batch(batch)
                add(1, Case(op, "fwd", img.shape, torch.float32, "NCHW", f"{preset} output batch {batch}"))
    ordered = []
    for rank in (0, 1):
        lists = [ranked.get((rank, op), []) for op in OPS if op in which]
        for i in range(max((len(v) for v in lists), default=0)):
            ordered += [v[i] for v in lists if i < len(v)]
    return ordered


# --------------------------------------------------------------- candidates
@contextlib.contextmanager
def _env(**kv):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update({k: str(v) for k, v in kv.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _forced(backend: Optional[str], fn: Callable, **env) -> Callable:
    if backend is None and not env:
        return fn

    def run(*a):
        with (ops.use_backend(backend) if backend else contextlib.nullcontext()), _env(**env):
            return fn(*a)
    return run


def kernel_variants(device: torch.device, op: str) -> Dict[str, Tuple[Optional[str], dict]]:
    """name -> (forced backend, env) for our candidates on this device."""
    out = {"imagen-fast": (None, {})}
    if device.type != "cuda":
        return out
    avail = ops.available_backends()
    has_choice = op in ("gn", "thr", "step")
    if avail["triton"] == "available" and has_choice:
        out["triton"] = ("triton", {})
    if avail["cuda"] == "available" and has_choice:
        out["cuda"] = ("cuda", {})
        if op == "gn":
            out["cuda onepass"] = ("cuda", {"IMAGEN_FAST_CUDA_GN_PATH": "onepass"})
            out["cuda split"] = ("cuda", {"IMAGEN_FAST_CUDA_GN_PATH": "split"})
    return out


def _apex_group_norm(c: int, groups: int, device, dtype):
    """apex.contrib.group_norm's fused NHWC GroupNorm, or None (not installed / unsupported)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from apex.contrib.group_norm import GroupNorm
    except Exception:  # noqa: BLE001 - optional peer
        return None
    return GroupNorm(groups, c, act="").to(device=device, dtype=dtype)


def _gn_candidates(case: Case, device, with_compile: bool):
    n, c = case.shape[:2]
    fmt = torch.channels_last if case.layout == "NHWC" else torch.contiguous_format
    size = case.dtype.itemsize
    grad = case.mode == "fwd+bwd"
    copies = harness.copies_for((5 if grad else 2) * case.numel * size, device=device)

    def rnd(*s, scale=1.0):
        return (scale * torch.randn(*s, device=device, dtype=case.dtype)).requires_grad_(grad)
    xs = [torch.randn(case.shape, device=device, dtype=case.dtype).contiguous(memory_format=fmt)
          .requires_grad_(grad) for _ in range(copies)]
    gys = [torch.randn_like(x) for x in xs] if grad else None
    w, b, s, sh = rnd(c), rnd(c), rnd(n, c, scale=0.3), rnd(n, c)
    if not case.film:
        s = sh = None
    params = [p for p in (w, b, s, sh) if p is not None]
    g = case.groups
    funcs: Dict[str, Callable] = {}
    for name, (backend, env) in kernel_variants(device, "gn").items():
        funcs[name] = _forced(backend, lambda x: ops.group_norm_silu(x, g, w, b, scale=s, shift=sh), **env)
    if case.film:
        funcs["eager"] = lambda x: eager_group_norm(x, g, w, b, s, sh)
    else:
        funcs["eager"] = lambda x: F.silu(F.group_norm(x, g, w, b))
    if with_compile:
        compiled = harness.fresh_compile(reference.group_norm_silu)
        funcs["compile"] = lambda x: compiled(x, g, w, b, 1e-5, s, sh, "silu")
    apex = _apex_group_norm(c, g, device, case.dtype) if case.layout == "NHWC" else None
    if apex is not None:
        apex.weight.data.copy_(w.detach())
        apex.bias.data.copy_(b.detach())
        if case.film:
            funcs["apex"] = lambda x: F.silu(apex(x) * (1 + s[:, :, None, None]) + sh[:, :, None, None])
        else:
            funcs["apex"] = lambda x: F.silu(apex(x))

    work = (5 if grad else 2) * case.numel * size
    return _norm_timers(funcs, xs, params, gys), ("bytes", work), xs[0]


def _norm_timers(funcs: Dict[str, Callable], xs, params, gys) -> Dict[str, Callable]:
    """Each norm candidate as a timed call on input copy i: the forward, or (gys given)
    forward + the gradients of x and the parameters."""
    copies = len(xs)

    def timer(fn):
        if gys is None:
            return lambda i: fn(xs[i % copies])

        def run(i):
            x = xs[i % copies]
            torch.autograd.grad(fn(x), [x, *params], gys[i % copies])
        return run
    return {k: timer(f) for k, f in funcs.items()}


def _rms_candidates(case: Case, device, with_compile: bool):
    n, c = case.shape[:2]
    fmt = torch.channels_last if case.layout == "NHWC" else torch.contiguous_format
    size = case.dtype.itemsize
    grad = case.mode == "fwd+bwd"
    copies = harness.copies_for((5 if grad else 2) * case.numel * size, device=device)
    xs = [torch.randn(case.shape, device=device, dtype=case.dtype).contiguous(memory_format=fmt)
          .requires_grad_(grad) for _ in range(copies)]
    gys = [torch.randn_like(x) for x in xs] if grad else None

    def rnd(*s, scale=1.0):
        return (scale * torch.randn(*s, device=device, dtype=case.dtype)).requires_grad_(grad)
    w, s, sh = rnd(c), rnd(n, c, scale=0.3), rnd(n, c)
    if not case.film:
        s = sh = None
    params = [p for p in (w, s, sh) if p is not None]
    eps = 1e-12 / c ** 0.5        # ChanRMSNorm's bound (see reference.channel_rms_norm_silu)
    funcs: Dict[str, Callable] = {}
    for name, (backend, env) in kernel_variants(device, "rms").items():
        funcs[name] = _forced(backend, lambda x: ops.channel_rms_norm_silu(x, w, eps, scale=s, shift=sh), **env)
    funcs["eager"] = lambda x: eager_chan_rms_norm(x, w, s, sh)
    if with_compile:
        compiled = harness.fresh_compile(reference.channel_rms_norm_silu)
        funcs["compile"] = lambda x: compiled(x, w, eps, s, sh, "silu")

    work = (5 if grad else 2) * case.numel * size
    return _norm_timers(funcs, xs, params, gys), ("bytes", work), xs[0]


def _attn_mask(case: Case, device):
    if not case.masked:
        return None
    b, _, _, lk, _ = case.shape
    text = case.text_len
    gen = torch.Generator().manual_seed(b + lk)
    lens = torch.randint(1, text + 1, (b,), generator=gen)
    m = torch.ones(b, lk, dtype=torch.bool)
    # self+text: image tokens first (always valid), then the padded text tokens
    m[:, lk - text:] = torch.arange(text)[None] < lens[:, None]
    return m.to(device)


def _sdpa_backends(device):
    from torch.nn.attention import SDPBackend
    names = {"sdpa math": SDPBackend.MATH, "sdpa flash": SDPBackend.FLASH_ATTENTION,
             "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION}
    if device.type == "cuda" and hasattr(SDPBackend, "CUDNN_ATTENTION"):
        names["sdpa cudnn"] = SDPBackend.CUDNN_ATTENTION
    return names


def _attn_candidates(case: Case, device, with_compile: bool):
    from torch.nn.attention import sdpa_kernel
    b, h, lq, lk, d = case.shape
    grad = case.mode == "fwd+bwd"
    size = case.dtype.itemsize
    copies = harness.copies_for(size * b * h * (lq + 2 * lk) * d * (2 if grad else 1), device=device)

    def rnd(*s):
        return torch.randn(*s, device=device, dtype=case.dtype).requires_grad_(grad)
    sets = [(rnd(b, h, lq, d), rnd(b, h, lk, d), rnd(b, h, lk, d)) for _ in range(copies)]
    gos = [torch.randn(b, h, lq, d, device=device, dtype=case.dtype) for _ in range(copies)] if grad else None
    mask = _attn_mask(case, device)
    sdpa_mask = None if mask is None else mask[:, None, None, :]
    funcs: Dict[str, Callable] = {}
    for name, (backend, env) in kernel_variants(device, "attn").items():
        funcs[name] = _forced(backend, lambda q, k, v: ops.attention(q, k, v, mask), **env)
    funcs["eager"] = lambda q, k, v: reference.attention(q, k, v, mask)
    if with_compile:
        compiled = harness.fresh_compile(reference.attention)
        funcs["compile"] = lambda q, k, v: compiled(q, k, v, mask)
    funcs["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)
    for name, backend in _sdpa_backends(device).items():
        def forced(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)
        funcs[name] = forced

    def wrap(fn):
        if not grad:
            return lambda i: fn(*sets[i % copies])

        def run(i):
            q, k, v = sets[i % copies]
            torch.autograd.grad(fn(q, k, v), [q, k, v], gos[i % copies])
        return run
    flops = 4 * b * h * lq * lk * d * (3.5 if grad else 1.0)
    return {k: wrap(f) for k, f in funcs.items()}, ("flops", flops), sets[0][0]


def _thr_candidates(case: Case, device, with_compile: bool):
    size = case.dtype.itemsize
    copies = harness.copies_for(2 * case.numel * size, device=device)
    xs = [2 * torch.randn(case.shape, device=device, dtype=case.dtype) for _ in range(copies)]
    funcs = {name: _forced(backend, lambda x: ops.dynamic_threshold(x, 0.995), **env)
             for name, (backend, env) in kernel_variants(device, "thr").items()}
    funcs["eager"] = quantile_threshold
    if with_compile:
        funcs["compile"] = harness.fresh_compile(quantile_threshold)
    return ({k: (lambda i, f=f: f(xs[i % copies])) for k, f in funcs.items()},
            ("bytes", 2 * case.numel * size), xs[0])


def _step_candidates(case: Case, device, with_compile: bool):
    size = case.dtype.itemsize
    copies = harness.copies_for(5 * case.numel * size, device=device)
    sets = [[torch.randn(case.shape, device=device, dtype=case.dtype) for _ in range(4)]
            for _ in range(copies)]

    def ours(z, c, u, nz):
        return ops.sampler_step(z, c, u, noise=nz, **STEP)
    funcs = {name: _forced(backend, ours, **env)
             for name, (backend, env) in kernel_variants(device, "step").items()}
    funcs["eager"] = eager_sampler_step()
    if with_compile:
        funcs["compile"] = harness.fresh_compile(eager_sampler_step())
    return ({k: (lambda i, f=f: f(*sets[i % copies])) for k, f in funcs.items()},
            ("bytes", 5 * case.numel * size), sets[0][0])


CANDIDATES = {"gn": _gn_candidates, "rms": _rms_candidates, "attn": _attn_candidates, "thr": _thr_candidates,
              "step": _step_candidates}
TITLES = {
    ("gn", "fwd"): "group_norm_silu forward (GroupNorm + FiLM + SiLU); bytes = 2 numel size",
    ("gn", "fwd+bwd"): "group_norm_silu forward + backward (grads of x, weight, bias, scale, "
                       "shift); bytes = 5 numel size",
    ("rms", "fwd"): "channel_rms_norm_silu forward (RMS norm over channels + FiLM + SiLU); "
                    "bytes = 2 numel size",
    ("rms", "fwd+bwd"): "channel_rms_norm_silu forward + backward (grads of x, weight, scale, shift); "
                        "bytes = 5 numel size",
    ("attn", "fwd"): "attention over image + text tokens (key padding mask where 'mask'); "
                     "FLOPs = 4 B H Lq Lk D",
    ("attn", "fwd+bwd"): "attention forward + backward (grads of q, k, v); FLOPs = 3.5 x forward",
    ("thr", "fwd"): "dynamic_threshold p=0.995 (eager = torch.quantile); bytes = 2 numel size",
    ("step", "fwd"): "sampler_step: guided DDPM step with dynamic thresholding; bytes = 5 numel size",
}
OP_NAMES = {"gn": "group_norm_silu", "rms": "channel_rms_norm_silu", "attn": "attention", "thr": "dynamic_threshold",
            "step": "sampler_step"}


def _usable(cands: Dict[str, Callable], device) -> Tuple[Dict[str, Callable], Dict[str, str]]:
    """Candidates that run on this case (one trial call each); the others with their error."""
    ok, failed = {}, {}
    for name, fn in cands.items():
        try:
            fn(0)
            harness._sync(device)
            ok[name] = fn
        except Exception as e:  # noqa: BLE001 - reported in the results, not hidden
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return ok, failed


def case_key(op, mode, shape, dtype, layout, masked, groups, film) -> tuple:
    return (op, mode, tuple(shape), dtype, layout, bool(masked), int(groups), bool(film))


def run_case(case: Case, device, rounds: int, min_round_s: float, roof: dict,
             with_compile: bool = True) -> dict:
    """One case timed: a JSON-ready record (what the tables, the plots, the choice table
    and --resume read)."""
    cands, work, probe = CANDIDATES[case.op](case, device, with_compile)
    cands, failed = _usable(cands, device)
    ctx = torch.no_grad() if case.mode == "fwd" else contextlib.nullcontext()
    with ctx:
        timings = harness.compare(cands, rounds=rounds, min_round_s=min_round_s, device=device)
    choice_op = CHOICE_OPS.get((case.op, case.mode))
    dt = DTYPE_NAMES[case.dtype]
    return {"op": case.op, "mode": case.mode, "shape": list(case.shape), "dtype": dt,
            "layout": case.layout, "source": case.source, "masked": case.masked,
            "text_len": case.text_len, "groups": case.groups, "film": case.film,
            "work": list(work), "timings": {k: v.as_dict() for k, v in timings.items()},
            "failed": failed,
            "roof": {"copy_gbs": roof["copy_gbs"], "matmul_gflops": roof["matmul_gflops"].get(dt)},
            "choice_class": gpu_choice.shape_class(choice_op, probe) if choice_op else None}


def record_key(r: dict) -> tuple:
    return case_key(r["op"], r["mode"], r["shape"], r["dtype"], r["layout"], r["masked"],
                    r["groups"], r["film"])


# ---------------------------------------------------------------- tables
PEERS = ("eager", "compile", "sdpa", "sdpa math", "sdpa flash", "sdpa efficient", "sdpa cudnn", "apex")
KERNELS = ("imagen-fast", "triton", "cuda", "cuda onepass", "cuda split")


def make_tables(records: List[dict], device_type: str) -> List[harness.Table]:
    tables = []
    for (op, mode), title in TITLES.items():
        rows = [r for r in records if (r["op"], r["mode"]) == (op, mode)]
        if not rows:
            continue
        seen = {k for r in rows for k in r["timings"]}
        ms_cols = [k for k in KERNELS + PEERS if k in seen]
        speed_cols = [p for p in ("eager", "compile") if p in seen]
        best_peer = [p for p in PEERS if p in seen and p not in ("eager", "compile")]
        flops_unit = 1e12 if device_type == "cuda" else 1e9
        unit = ("TFLOP/s" if device_type == "cuda" else "GFLOP/s") if op == "attn" else "GB/s"
        frac = "fraction of matmul" if op == "attn" else "fraction of copy"
        cols = (["source", "shape", "dtype", "layout"] + [f"{k} ms" for k in ms_cols]
                + [f"x {p}" for p in speed_cols] + (["x best SDPA"] if best_peer else [])
                + [unit, frac])
        table = harness.Table(title, cols)
        for r in rows:
            t = {k: v["median_ms"] for k, v in r["timings"].items()}
            ours = t.get("imagen-fast", float("nan"))
            layout = r["layout"] + (" mask" if r["masked"] else (" no mask" if op == "attn" else ""))
            row = [r["source"], "x".join(map(str, r["shape"])), r["dtype"], layout]
            row += [t.get(k, "n/a") for k in ms_cols]
            row += [t[p] / ours if p in t else "n/a" for p in speed_cols]
            if best_peer:
                present = [t[p] for p in best_peer if p in t]
                row.append(min(present) / ours if present else "n/a")
            kind, amount = r["work"]
            rate = amount / (ours * 1e-3)
            if kind == "flops":
                peak = r["roof"]["matmul_gflops"]
                row += [rate / flops_unit, rate / (peak * 1e9) if peak else "n/a"]
            else:
                row += [rate / 1e9, rate / 1e9 / r["roof"]["copy_gbs"]]
            table.add(*row)
        failed = sorted({f"{k}: {v}" for r in rows for k, v in r["failed"].items()})
        table.notes += [f"not run (n/a above): {f}" for f in failed[:6]]
        tables.append(table)
    return tables


def summary_table(records: List[dict]) -> harness.Table:
    """One row per (op, pass): cases, and the range (median) of each speedup and of the
    roofline fraction over them: the table the README shows."""
    table = harness.Table("Summary: imagen-fast's speedup over each baseline, min - max (median) over the cases",
                          ["op", "pass", "cases", "x eager", "x compile", "x best SDPA", "x triton (cuda)",
                           "fraction of roofline"])

    def spread(vals):
        vals = sorted(v for v in vals if v == v)
        if not vals:
            return "n/a"
        return f"{vals[0]:.2f} - {vals[-1]:.2f} ({vals[len(vals) // 2]:.2f})"
    for (op, mode) in TITLES:
        rows = [r for r in records if (r["op"], r["mode"]) == (op, mode)]
        if not rows:
            continue
        def ratio(r, names, ours="imagen-fast"):
            t = {k: v["median_ms"] for k, v in r["timings"].items()}
            present = [t[n] for n in names if n in t]
            return min(present) / t[ours] if present and ours in t else float("nan")
        sdpa = [p for p in PEERS if p.startswith("sdpa")]
        frac = []
        for r in rows:
            kind, amount = r["work"]
            rate = amount / (r["timings"]["imagen-fast"]["median_ms"] * 1e-3)
            peak = ((r["roof"]["matmul_gflops"] or float("nan")) * 1e9 if kind == "flops"
                    else r["roof"]["copy_gbs"] * 1e9)
            frac.append(rate / peak)
        table.add(OP_NAMES[op], mode, len(rows), spread(ratio(r, ["eager"]) for r in rows),
                  spread(ratio(r, ["compile"]) for r in rows),
                  spread(ratio(r, sdpa) for r in rows) if op == "attn" else "",
                  spread(ratio(r, ["triton"], ours="cuda") for r in rows),
                  spread(frac) + (" of matmul" if op == "attn" else " of copy"))
    empty = [i for i in range(len(table.columns)) if all(row[i] in ("", "n/a") for row in table.rows)]
    table.columns = [c for i, c in enumerate(table.columns) if i not in empty]
    table.rows = [[v for i, v in enumerate(row) if i not in empty] for row in table.rows]
    return table


# ------------------------------------------------------------ the choice table
CHOICE_OPS = {("gn", "fwd"): "group_norm_silu_fwd", ("gn", "fwd+bwd"): "group_norm_silu_bwd",
              ("thr", "fwd"): "dynamic_threshold", ("step", "fwd"): "sampler_step"}


def choice_entries(records: List[dict], arch: str, gpu: str, commit: str) -> List[dict]:
    """Per (op, shape class): both backends' summed ms over the cases of the class, the
    faster one the choice. The backward's time is fwd+bwd minus the same shape's fwd."""
    fwd = {(tuple(r["shape"]), r["dtype"], r["layout"], r["film"]): r["timings"]
           for r in records if (r["op"], r["mode"]) == ("gn", "fwd")}
    sums: Dict[Tuple[str, str], dict] = {}
    for r in records:
        op = CHOICE_OPS.get((r["op"], r["mode"]))
        t = r["timings"]
        if op is None or r.get("choice_class") is None or not all(b in t for b in gpu_choice.GPU_BACKENDS):
            continue
        ms = {b: t[b]["median_ms"] for b in gpu_choice.GPU_BACKENDS}
        if op == "group_norm_silu_bwd":
            f = fwd.get((tuple(r["shape"]), r["dtype"], r["layout"], r["film"]), {})
            if not all(b in f for b in gpu_choice.GPU_BACKENDS):
                continue
            ms = {b: max(ms[b] - f[b]["median_ms"], 1e-6) for b in ms}
        cls = r["choice_class"]
        e = sums.setdefault((op, repr(sorted(cls.items()))),
                            {"op": op, "arch": arch, "gpu": gpu, "class": cls,
                             "ms": {b: 0.0 for b in ms}, "cases": []})
        for b in ms:
            e["ms"][b] += ms[b]
        e["cases"].append("x".join(map(str, r["shape"])))
    date = time.strftime("%Y-%m-%d")
    out = []
    for e in sums.values():
        e["backend"] = min(e["ms"], key=e["ms"].get)
        e["ms"] = {b: round(v, 5) for b, v in e["ms"].items()}
        e.update(commit=commit, date=date)
        out.append(e)
    return out


# ------------------------------------------------------------------- main
def _previous(results_dir: Path, name: str, machine: dict) -> Tuple[List[dict], List[dict]]:
    """Records and run notes of an earlier run of this benchmark on the same machine."""
    path = Path(results_dir) / f"{name}.json"
    if not path.exists():
        return [], []
    import json
    data = json.loads(path.read_text())
    old = data.get("machine", {})
    for k in ("cpu", "gpu", "cpu_count"):
        if old.get(k) != machine.get(k):
            raise SystemExit(f"bench_ops --resume: {path} was measured on another machine "
                             f"({k}: {old.get(k)!r} vs {machine.get(k)!r})")
    return data.get("raw", {}).get("cases", []), data.get("raw", {}).get("runs", [])


def render(results_dir: Path, name: str) -> int:
    """Tables and plot again from a results JSON (after a change to how they are drawn)."""
    import json
    path = Path(results_dir) / f"{name}.json"
    if not path.exists():
        print(f"bench_ops --render: no results file {path}", file=sys.stderr)
        return 2
    data = json.loads(path.read_text())
    records, runs = data["raw"]["cases"], data["raw"].get("runs", [])
    m = data["machine"]
    tables = all_tables(records, "cuda" if m.get("gpu") else "cpu", m.get("rounds"), m.get("threads"), runs)
    harness.write_results(results_dir, name, data["machine"], tables, data["raw"])
    try:
        from imagen_fast.bench.plots import plot_speedups
        print(f"wrote {plot_speedups(path)}")
    except ImportError:
        pass
    print(f"wrote {path.with_suffix('.md')}")
    return 0


def all_tables(records, device_type: str, rounds, threads, runs) -> List[harness.Table]:
    tables = [summary_table(records)] + make_tables(records, device_type)
    warning = None if device_type == "cuda" else harness.load_warning(
        [v for r in runs for v in (r["load_average"][0], r["load_average_end"][0])])
    if warning:
        tables[0].notes.append(warning)
    for t in tables:
        t.notes.insert(0, f"Medians of {rounds} interleaved rounds; "
                          f"{'CUDA events' if device_type == 'cuda' else 'wall clock'}; {threads} threads; "
                          "fractions use the copy bandwidth / matmul rate measured at the start of "
                          "the run that timed the row. " + _runs_note(runs))
    return tables


def _runs_note(runs: List[dict]) -> str:
    return "Runs: " + "; ".join(
        f"{r['date']} commit {r['git_commit']}, copy {r['copy_gbs']}->{r['copy_gbs_end']} GB/s, "
        f"load {r['load_average'][0]}->{r['load_average_end'][0]}, others' CPU share "
        f"{r.get('others_cpu_share', 'n/a')}, quiet machine: {r['quiet']}"
        + (f", BUSY: {'; '.join(r['busy'])}" if r.get("busy") else "")
        for r in runs) + "."


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: a few shapes, few rounds, torch.compile for the first case of each "
                         "op and pass only (unless --compile-limit says otherwise)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma list of {OPS}")
    ap.add_argument("--presets", default="", help="comma list of presets (default: per device)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new cases after this many seconds (the results keep what ran)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")
    ap.add_argument("--compile-limit", type=int, default=None, metavar="N",
                    help="torch.compile only the first N cases of each op and pass (compiling "
                         "is most of a case's time; the GPU session uses 2)")
    ap.add_argument("--no-choice", action="store_true",
                    help="(GPU) do not write the triton/cuda choice table")
    ap.add_argument("--choice-table", type=Path, default=None, metavar="PATH",
                    help="(GPU) where the choice table goes: the package's table with this GPU's "
                         "entries merged in (default <results-dir>/gpu_choice.json; a checkout "
                         "commits it as imagen_fast/ops/gpu_choice.json)")
    ap.add_argument("--out", default=None, help="results name (default cpu_ops / gpu_ops_<gpu>)")
    harness.add_results_arg(ap)
    ap.add_argument("--resume", action="store_true",
                    help="keep the cases already in the results file (same machine) and run the rest")
    ap.add_argument("--quiet", default="unknown", choices=["yes", "no", "unknown"],
                    help="record whether other work was paused on the machine during the run")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the markdown and PNG from the results JSON (no timing)")
    args = ap.parse_args(argv)
    if args.render:
        return render(args.results_dir, args.out or "cpu_ops")
    which = [w for w in args.ops.split(",") if w]
    bad = sorted(set(which) - set(OPS))
    if bad:
        ap.error(f"--ops: unknown {bad}; choose from {OPS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_ops: --device cuda but no CUDA GPU is visible (torch.cuda.is_available() is "
              "False); run it on a GPU machine, or use --device cpu", file=sys.stderr)
        return 2
    harness.set_allocator_env()
    device = torch.device(args.device)
    threads = int(os.environ.get("IMAGEN_FAST_BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rounds = args.rounds or ((5 if args.quick else 21) if device.type == "cpu" else (10 if args.quick else 30))
    min_round_s = 0.02 if device.type == "cpu" else 0.002
    presets = [p for p in args.presets.split(",") if p] or None
    cases = build_cases(device, args.quick, which, presets)

    mm_dtypes = sorted({DTYPE_NAMES[c.dtype] for c in cases if c.op == "attn"})
    watch = harness.Watch(device, threads)
    copy_gbs = watch.start()["copy_gbs"]
    matmul = {dt: harness.measure_matmul_rate(device, dtype=getattr(torch, dt), rounds=5)
              for dt in mm_dtypes}
    roof = {"copy_gbs": copy_gbs, "matmul_gflops": matmul}
    print(f"copy bandwidth {copy_gbs:.1f} GB/s; matmul " +
          ", ".join(f"{dt} {v:.0f} GFLOP/s" for dt, v in matmul.items()), flush=True)
    machine = harness.machine_info(device)
    machine.update(copy_gbs=round(copy_gbs, 2), matmul_gflops={k: round(v, 1) for k, v in matmul.items()},
                   threads=threads, backends=ops.available_backends(), quick=args.quick)

    name = args.out or ("cpu_ops" if device.type == "cpu" else
                        "gpu_ops_" + _slug(torch.cuda.get_device_name(device)))
    records, runs = _previous(args.results_dir, name, machine) if args.resume else ([], [])
    done = {record_key(r) for r in records}
    t0 = time.perf_counter()
    skipped = []
    todo = [c for c in cases if case_key(c.op, c.mode, c.shape, DTYPE_NAMES[c.dtype], c.layout,
                                         c.masked, c.groups, c.film) not in done]
    compile_limit = args.compile_limit if args.compile_limit is not None else (1 if args.quick else None)
    compiled: Dict[Tuple[str, str], int] = {}
    for case in harness.progress(todo, desc=f"bench ops ({device.type})"):
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            skipped.append(f"{case.label()}: time budget")
            continue
        n = compiled.get((case.op, case.mode), 0)
        with_compile = not args.no_compile and (compile_limit is None or n < compile_limit)
        compiled[(case.op, case.mode)] = n + with_compile
        try:
            records.append(run_case(case, device, rounds, min_round_s, roof, with_compile))
        except Exception as e:  # noqa: BLE001 - one broken case must not lose the rest
            skipped.append(f"{case.label()}: {type(e).__name__}: {str(e)[:160]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    watch.stop()
    machine.update(watch.fields(), elapsed_s=round(time.perf_counter() - t0, 1), rounds=rounds,
                   quiet=args.quiet)
    runs.append({k: machine.get(k) for k in ("date", "git_commit", "copy_gbs", "copy_gbs_end",
                                             "load_average", "load_average_end", "elapsed_s", "quiet",
                                             "others_cpu_share", "busy")})
    tables = all_tables(records, device.type, rounds, threads, runs)
    raw = {"cases": records, "skipped": skipped, "runs": runs}
    if device.type == "cuda":
        arch, gpu = gpu_choice.arch_of(device)
        entries = choice_entries(records, arch, gpu, machine["git_commit"])
        raw["gpu_choice"] = entries
        if entries and not args.no_choice:
            merged = gpu_choice.merge_entries(gpu_choice.read_table(gpu_choice.TABLE_PATH), entries)
            table_path = args.choice_table or Path(args.results_dir) / "gpu_choice.json"
            table_path.parent.mkdir(parents=True, exist_ok=True)
            print(f"wrote {gpu_choice.write_table(merged, table_path)} ({len(entries)} entries for {arch}; "
                  f"IMAGEN_FAST_GPU_CHOICE={table_path} makes the ops read it)")
    path = harness.write_results(args.results_dir, name, machine, tables, raw)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    if skipped:
        print(f"{len(skipped)} cases not run (budget or error): see raw.skipped in the JSON")
    try:
        from imagen_fast.bench.plots import plot_speedups
        print(f"wrote {plot_speedups(path)}")
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
