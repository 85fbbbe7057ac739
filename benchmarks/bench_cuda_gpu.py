"""CUDA C++ kernels (backend "cuda") on a GPU against the Triton kernels, PyTorch eager
and torch.compile: same harness, shapes, byte counts and targets as bench_triton_gpu.

    python -m benchmarks.bench_cuda_gpu [--quick] [--ops gn,thr,step] [--out NAME]

Timing: triton.testing.do_bench through bench_triton_gpu._bench (CUDA events, L2
flushed before every call, median with 10th/90th percentiles, inputs rotated over
copies totalling more than 4x L2). Every number is per call, Python dispatch included.

What is counted:
  group_norm_silu fwd    bytes = read x + write y                      = 2 * numel * size
  group_norm_silu bwd    bytes = read x + read dy + write dx           = 3 * numel * size
  dynamic_threshold      bytes = read x0 + write out                   = 2 * numel * size
  sampler_step (guided)  bytes = read z, cond, uncond, noise + write   = 5 * numel * size
GB/s is compared with this card's measured copy bandwidth.

GroupNorm rows also time both cuda paths forced (IMAGEN_FAST_CUDA_GN_PATH=onepass /
split) next to the automatic choice, the data for tuning the path heuristic in
csrc/include/imagen_fast/cuda_group_norm_launch.cuh and the triton/cuda choice of the
ops layer.

Targets (issue 4, same as the Triton kernels', H100, bf16): group_norm_silu fwd >= 80%
of copy bandwidth and >= 2x eager; bwd >= 2x eager; dynamic_threshold >= 50x
torch.quantile at 8x3x256x256.

Results: benchmarks/results/cuda_gpu_<gpu>.json and .md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.baselines import eager_group_norm, eager_sampler_step, quantile_threshold  # noqa: E402
from benchmarks.bench_triton_gpu import (GN_SHAPES, THRESH_SHAPES, _bench, _copies,  # noqa: E402
                                         _ms, _safe,
                                         measure_copy_gbs)
from imagen_fast import ops  # noqa: E402
from imagen_fast.ops import reference  # noqa: E402

NO_GPU = ("bench_cuda_gpu: no CUDA GPU is visible (torch.cuda.is_available() is False). "
          "This benchmark times the CUDA C++ kernels on a GPU; run it on a CUDA machine: "
          "python -m benchmarks.bench_cuda_gpu")


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


def _on(backend, fn, **env):
    def run(i):
        with ops.use_backend(backend), _env(**env):
            return fn(i)
    return run


def bench_group_norm(shapes, dtype, copy_gbs, table_f, table_b, raw):
    from imagen_fast.ops import _cuda_backend as cb
    compiled = torch.compile(reference.group_norm_silu, dynamic=False)
    size = torch.finfo(dtype).bits // 8
    have_triton = ops.available_backends()["triton"] == "available"
    for shape in shapes:
        n, c = shape[:2]
        numel = torch.Size(shape).numel()
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            copies = _copies(2 * numel * size)
            xs = [torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                  .requires_grad_() for _ in range(copies)]
            w, b = (torch.randn(c, device="cuda", requires_grad=True) for _ in range(2))
            s = (0.3 * torch.randn(n, c, device="cuda")).requires_grad_()
            sh = torch.randn(n, c, device="cuda", requires_grad=True)
            wl, bl, sl, shl = (t.detach().to(dtype).requires_grad_() for t in (w, b, s, sh))
            gn = lambda i: ops.group_norm_silu(xs[i], 32, w, b, scale=s, shift=sh)  # noqa: E731
            plan_f = cb.group_norm_plan(xs[0], 32)
            plan_b = cb.group_norm_plan(xs[0], 32, backward=True)
            fwd = {
                "cuda": _on("cuda", gn),
                "cuda onepass": _on("cuda", gn, IMAGEN_FAST_CUDA_GN_PATH="onepass"),
                "cuda split": _on("cuda", gn, IMAGEN_FAST_CUDA_GN_PATH="split"),
                "eager": lambda i: eager_group_norm(xs[i], 32, wl, bl, sl, shl),
                "compile": lambda i: compiled(xs[i], 32, wl, bl, 1e-5, sl, shl, "silu"),
            }
            if have_triton:
                fwd["triton"] = _on("triton", gn)
            with torch.no_grad():
                tf = {k: _safe(lambda f=f: _bench(f, copies)) for k, f in fwd.items()}
            tb = {}
            for k, f in fwd.items():
                def prep(k=k, f=f):
                    ys = [f(i) for i in range(copies)]
                    gys = [torch.randn_like(y) for y in ys]
                    params = [wl, bl, sl, shl] if k in ("eager", "compile") else [w, b, s, sh]
                    backend = k.split()[0] if k.split()[0] in ("cuda", "triton") else None
                    env = {"IMAGEN_FAST_CUDA_GN_PATH": k.split()[1]} if " " in k else {}

                    def back(i):
                        ctx = ops.use_backend(backend) if backend else contextlib.nullcontext()
                        with ctx, _env(**env):
                            torch.autograd.grad(ys[i], [xs[i], *params], gys[i], retain_graph=True)
                    return _bench(back, copies)
                tb[k] = _safe(prep)
            layout = "NHWC" if cl else "NCHW"
            for table, t, plan, nbytes, op in ((table_f, tf, plan_f, 2 * numel * size, "fwd"),
                                               (table_b, tb, plan_b, 3 * numel * size, "bwd")):
                ours = _ms(t["cuda"])
                gbs = nbytes / (ours * 1e-3) / 1e9
                tri = _ms(t.get("triton", {}))
                table.add("x".join(map(str, shape)), layout, plan["path"], ours,
                          _ms(t["cuda onepass"]), _ms(t["cuda split"]), tri, _ms(t["eager"]),
                          _ms(t["compile"]), _ms(t["eager"]) / ours, tri / ours, gbs,
                          gbs / copy_gbs)
                raw.setdefault(f"group_norm_silu {op}", []).append(
                    {"shape": list(shape), "layout": layout, "dtype": str(dtype), "bytes": nbytes,
                     "plan": plan, **t})
                print(f"group_norm {op}", *table.rows[-1], flush=True)


def bench_threshold(shapes, dtype, copy_gbs, table, raw):
    compiled = torch.compile(quantile_threshold, dynamic=False)
    size = torch.finfo(dtype).bits // 8
    for shape in shapes:
        numel = torch.Size(shape).numel()
        copies = _copies(2 * numel * size)
        xs = [2 * torch.randn(shape, device="cuda", dtype=dtype) for _ in range(copies)]
        thr = lambda i: ops.dynamic_threshold(xs[i], 0.995)  # noqa: E731
        cands = {"cuda": _on("cuda", thr), "triton": _on("triton", thr),
                 "torch.quantile": lambda i: quantile_threshold(xs[i]),
                 "compile": lambda i: compiled(xs[i])}
        t = {k: _safe(lambda f=f: _bench(f, copies)) for k, f in cands.items()}
        _row(table, raw, "dynamic_threshold", shape, dtype, t, 2 * numel * size, copy_gbs)


def bench_sampler(shapes, dtype, copy_gbs, table, raw):
    eager = eager_sampler_step()
    compiled = torch.compile(eager, dynamic=False)
    size = torch.finfo(dtype).bits // 8
    for shape in shapes:
        numel = torch.Size(shape).numel()
        copies = _copies(5 * numel * size)
        sets = [[torch.randn(shape, device="cuda", dtype=dtype) for _ in range(4)]
                for _ in range(copies)]
        step = lambda i: ops.sampler_step(*sets[i][:3], noise=sets[i][3], guidance_scale=5.0,  # noqa: E731
                                          alpha_t=0.6, sigma_t=0.8, alpha_s=0.8, sigma_s=0.6)
        cands = {"cuda": _on("cuda", step), "triton": _on("triton", step),
                 "torch.quantile": lambda i: eager(*sets[i]),
                 "compile": lambda i: compiled(*sets[i])}
        t = {k2: _safe(lambda f=f: _bench(f, copies)) for k2, f in cands.items()}
        _row(table, raw, "sampler_step", shape, dtype, t, 5 * numel * size, copy_gbs)


def _row(table, raw, op, shape, dtype, t, nbytes, copy_gbs):
    ours = _ms(t["cuda"])
    gbs = nbytes / (ours * 1e-3) / 1e9
    table.add("x".join(map(str, shape)), str(dtype).replace("torch.", ""), ours, _ms(t["triton"]),
              _ms(t["torch.quantile"]), _ms(t["compile"]), _ms(t["triton"]) / ours,
              _ms(t["torch.quantile"]) / ours, gbs, gbs / copy_gbs)
    raw.setdefault(op, []).append({"shape": list(shape), "dtype": str(dtype), "bytes": nbytes, **t})
    print(op, *table.rows[-1], flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few shapes (a smoke run)")
    ap.add_argument("--ops", default="gn,thr,step")
    ap.add_argument("--out", default=None, help="results name (default cuda_gpu_<gpu>)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    status = ops.available_backends()["cuda"]
    if status != "available":
        print(f"bench_cuda_gpu: backend cuda unavailable: {status}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(0)
    name = args.out or "cuda_gpu_" + re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    copy_gbs = measure_copy_gbs()
    print(f"{gpu}: copy {copy_gbs:.0f} GB/s", flush=True)
    machine = harness.machine_info(dev)
    machine["copy_gbs"] = round(copy_gbs, 1)
    note = (f"do_bench medians (L2 flushed per call, inputs rotated); copy {copy_gbs:.0f} GB/s "
            f"measured by this script; per call including Python dispatch.")
    sel = set(args.ops.split(","))
    quick = args.quick
    bf16 = torch.bfloat16
    gcols = ["shape", "layout", "auto path", "cuda ms", "cuda onepass ms", "cuda split ms",
             "triton ms", "eager ms", "compile ms", "x eager", "x triton", "GB/s",
             "fraction of copy"]
    tcols = ["shape", "dtype", "cuda ms", "triton ms", "torch.quantile ms", "compile ms",
             "x triton", "x quantile", "GB/s", "fraction of copy"]
    tables, raw = [], {}
    if "gn" in sel:
        tf = harness.Table("group_norm_silu forward (32 groups, FiLM, SiLU); bytes = 2 numel size",
                           gcols, notes=[note])
        tb = harness.Table("group_norm_silu backward alone; bytes = 3 numel size", gcols,
                           notes=[note])
        bench_group_norm(GN_SHAPES[:2] if quick else GN_SHAPES, bf16, copy_gbs, tf, tb, raw)
        tables += [tf, tb]
    if "thr" in sel:
        tt = harness.Table("dynamic_threshold p=0.995; bytes = 2 numel size", tcols, notes=[note])
        for dt in ((torch.float32,) if quick else (torch.float32, bf16)):
            bench_threshold(THRESH_SHAPES[1:2] if quick else THRESH_SHAPES, dt, copy_gbs, tt, raw)
        tables.append(tt)
    if "step" in sel:
        ts = harness.Table("sampler_step (guided DDPM, dynamic threshold); bytes = 5 numel size",
                           tcols, notes=[note])
        bench_sampler(THRESH_SHAPES[1:2] if quick else THRESH_SHAPES[1:], bf16, copy_gbs, ts, raw)
        tables.append(ts)
    path = harness.write_results(name, machine, tables, raw)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
