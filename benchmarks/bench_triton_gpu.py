"""Triton kernels on a CUDA GPU against PyTorch eager, torch.compile and SDPA.

    python -m benchmarks.bench_triton_gpu [--quick] [--ops gn,attn,thr,step] [--out NAME]

Timing: triton.testing.do_bench (CUDA events around each call, the L2 cache flushed
before every call, median with 10th/90th percentiles); inputs additionally rotate
over copies whose total exceeds 4x the L2 size. Every number is per call.

What is counted (stated next to every table, raw numbers in the JSON):
  group_norm_silu fwd       bytes = read x + write y                = 2 * numel * size
  group_norm_silu bwd       bytes = read x + read dy + write dx     = 3 * numel * size
                            (the backward alone: autograd.grad on a kept graph)
  attention fwd             FLOPs = 4 * B * H * Lq * Lk * D   (QK^T and PV, dense Lk)
  attention fwd+bwd         FLOPs = 3.5 x the forward (fwd 2 matmuls + bwd 5)
  dynamic_threshold         bytes = read x0 + write out             = 2 * numel * size
  sampler_step (guided)     bytes = read z, cond, uncond, noise + write z_s = 5 * numel * size
Achieved GB/s (TFLOP/s) is compared with this card's copy bandwidth (dst.copy_(src),
read + write, 1 GiB buffers) and bf16 matmul rate (8192^3 torch.matmul), both
measured here at start.

Targets (issue 3, H100, bf16, Imagen shapes): group_norm_silu fwd >= 80% of copy
bandwidth and >= 2x eager; bwd >= 2x eager; attention with a padding mask >= 1.5x
SDPA with the same mask and no slower than SDPA's flash backend without a mask;
dynamic_threshold >= 50x torch.quantile at 8x3x256x256.

Results: benchmarks/results/triton_gpu_<gpu>.json and .md.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `imagen_fast` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.baselines import eager_group_norm, eager_sampler_step, quantile_threshold  # noqa: E402
from imagen_fast import ops  # noqa: E402
from imagen_fast.ops import reference  # noqa: E402

NO_GPU = ("bench_triton_gpu: no CUDA GPU is visible (torch.cuda.is_available() is False). "
          "This benchmark times the Triton kernels on a GPU; run it on a CUDA machine: "
          "python -m benchmarks.bench_triton_gpu")

# Imagen shapes. Base 64x64 model: 512-2048 channels at 8-32 px; SR 256: 128-1024
# channels at 16-256 px. (N, C, H, W), GroupNorm with 32 groups.
GN_SHAPES = [
    (16, 512, 32, 32), (16, 1024, 16, 16), (16, 2048, 8, 8),          # base 64
    (8, 128, 256, 256), (8, 256, 128, 128), (8, 512, 64, 64), (8, 1024, 16, 16),  # SR 256
]
# (B, H, Lq, Lk, D, text tokens): image tokens over text tokens (Lk = 77), and over
# 128 text tokens concatenated with the image tokens (the base model's layers).
ATTN_SHAPES = [
    (16, 8, 1024, 77, 64, 77),
    (16, 8, 1024, 128 + 1024, 64, 128),
    (8, 8, 4096, 128, 64, 128),
    (16, 16, 256, 128 + 256, 128, 128),
    (16, 8, 1024, 128 + 1024, 32, 128),
]
THRESH_SHAPES = [(8, 3, 64, 64), (8, 3, 256, 256), (8, 3, 1024, 1024)]


def _bench(fn, copies):
    """Median / p10 / p90 ms of fn(i) with i rotating over the input copies."""
    import triton.testing

    state = {"i": 0}

    def call():
        state["i"] += 1
        fn(state["i"] % copies)

    med, p10, p90 = triton.testing.do_bench(call, warmup=25, rep=200, quantiles=[0.5, 0.1, 0.9])
    return {"median_ms": med, "p10_ms": p10, "p90_ms": p90}


def _copies(nbytes):
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, min(64, -(-4 * l2 // max(1, nbytes))))


def measure_copy_gbs():
    n = (1 << 30) // 4
    src, dst = torch.rand(n, device="cuda"), torch.empty(n, device="cuda")
    t = _bench(lambda i: dst.copy_(src), 1)["median_ms"]
    return 2 * n * 4 / (t * 1e-3) / 1e9


def measure_matmul_tflops():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = _bench(lambda i: torch.matmul(a, b), 1)["median_ms"]
    return 2 * 8192 ** 3 / (t * 1e-3) / 1e12


def _triton(fn):
    def run(i):
        with ops.use_backend("triton"):
            return fn(i)
    return run


def _safe(fn):
    """A candidate that may not run (e.g. torch.quantile above 2^24 elements)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        return {"error": f"{type(e).__name__}: {str(e)[:120]}"}


def _ms(t):
    return t.get("median_ms", float("nan"))


# ---------------------------------------------------------------- group norm
def bench_group_norm(shapes, dtype, copy_gbs, table_f, table_b, raw):
    compiled = torch.compile(reference.group_norm_silu, dynamic=False)
    size = torch.finfo(dtype).bits // 8
    for shape in shapes:
        n, c = shape[:2]
        numel = torch.Size(shape).numel()
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            copies = _copies(2 * numel * size)
            xs = [torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                  .requires_grad_() for _ in range(copies)]
            w, b = (torch.randn(c, device="cuda", requires_grad=True) for _ in range(2))
            s, sh = (0.3 * torch.randn(n, c, device="cuda")).requires_grad_(), \
                torch.randn(n, c, device="cuda", requires_grad=True)
            wl, bl, sl, shl = (t.detach().to(dtype).requires_grad_() for t in (w, b, s, sh))
            fwd = {
                "triton": _triton(lambda i: ops.group_norm_silu(xs[i], 32, w, b, scale=s,
                                                                shift=sh)),
                "eager": lambda i: eager_group_norm(xs[i], 32, wl, bl, sl, shl),
                "compile": lambda i: compiled(xs[i], 32, wl, bl, 1e-5, sl, shl, "silu"),
            }
            with torch.no_grad():
                tf = {k: _safe(lambda f=f: _bench(f, copies)) for k, f in fwd.items()}
            # backward alone: one graph per input copy, autograd.grad(retain_graph=True)
            tb = {}
            for k, f in fwd.items():
                def prep(f=f):
                    ys = [f(i) for i in range(copies)]
                    gys = [torch.randn_like(y) for y in ys]
                    params = [w, b, s, sh] if k == "triton" else [wl, bl, sl, shl]

                    def back(i):
                        ctx = ops.use_backend("triton") if k == "triton" else _null()
                        with ctx:
                            torch.autograd.grad(ys[i], [xs[i], *params], gys[i],
                                                retain_graph=True)
                    return _bench(back, copies)
                tb[k] = _safe(prep)
            layout = "NHWC" if cl else "NCHW"
            for table, t, nbytes, op in ((table_f, tf, 2 * numel * size, "fwd"),
                                         (table_b, tb, 3 * numel * size, "bwd")):
                ours = _ms(t["triton"])
                gbs = nbytes / (ours * 1e-3) / 1e9
                table.add("x".join(map(str, shape)), layout, ours, _ms(t["eager"]),
                          _ms(t["compile"]), _ms(t["eager"]) / ours, _ms(t["compile"]) / ours,
                          gbs, gbs / copy_gbs)
                raw.setdefault(f"group_norm_silu {op}", []).append(
                    {"shape": list(shape), "layout": layout, "dtype": str(dtype), "bytes": nbytes,
                     **t})
                print(f"group_norm {op}", *table.rows[-1], flush=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ----------------------------------------------------------------- attention
def _mask(b, lk, text):
    """Text tokens padded at random lengths (>= 1); image tokens (after the text) kept."""
    lens = torch.randint(1, text + 1, (b,), generator=torch.Generator().manual_seed(b + lk))
    m = torch.ones(b, lk, dtype=torch.bool)
    m[:, :text] = torch.arange(text)[None] < lens[:, None]
    return m.cuda()


def bench_attention(shapes, dtype, mm_tflops, table, raw):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    compiled = torch.compile(reference.attention, dynamic=False)
    for (b, h, lq, lk, d, text) in shapes:
        copies = _copies(2 * b * h * (lq + 2 * lk) * d)
        qs = [torch.randn(b, h, lq, d, device="cuda", dtype=dtype, requires_grad=True)
              for _ in range(copies)]
        ks = [torch.randn(b, h, lk, d, device="cuda", dtype=dtype, requires_grad=True)
              for _ in range(copies)]
        vs = [torch.randn(b, h, lk, d, device="cuda", dtype=dtype, requires_grad=True)
              for _ in range(copies)]
        mask = _mask(b, lk, text)
        sdpa_mask = mask[:, None, None, :]

        def flash(i):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qs[i], ks[i], vs[i])
        cands = {
            "triton masked": _triton(lambda i: ops.attention(qs[i], ks[i], vs[i], mask)),
            "sdpa masked": lambda i: F.scaled_dot_product_attention(qs[i], ks[i], vs[i],
                                                                    attn_mask=sdpa_mask),
            "compile masked": lambda i: compiled(qs[i], ks[i], vs[i], mask),
            "triton no mask": _triton(lambda i: ops.attention(qs[i], ks[i], vs[i])),
            "sdpa flash no mask": flash,
        }
        flops = 4 * b * h * lq * lk * d
        row = {}
        for name, f in cands.items():
            with torch.no_grad():
                row[f"{name} fwd"] = _safe(lambda f=f: _bench(f, copies))
            go = torch.randn(b, h, lq, d, device="cuda", dtype=dtype)

            def fb(i, f=f):
                out = f(i)
                torch.autograd.grad(out, [qs[i], ks[i], vs[i]], go)
            row[f"{name} fwd+bwd"] = _safe(lambda fb=fb: _bench(fb, copies))
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            ours = _ms(row[f"triton masked {mode}"])
            ours_nm = _ms(row[f"triton no mask {mode}"])
            tfl = mult * flops / (ours * 1e-3) / 1e12
            table.add(f"{b}x{h}x{lq}x{lk}x{d} ({text} text)", mode, ours,
                      _ms(row[f"sdpa masked {mode}"]), _ms(row[f"compile masked {mode}"]),
                      _ms(row[f"sdpa masked {mode}"]) / ours, ours_nm,
                      _ms(row[f"sdpa flash no mask {mode}"]),
                      _ms(row[f"sdpa flash no mask {mode}"]) / ours_nm, tfl, tfl / mm_tflops)
            print("attention", *table.rows[-1], flush=True)
        raw.setdefault("attention", []).append(
            {"shape": [b, h, lq, lk, d], "text_tokens": text, "dtype": str(dtype),
             "fwd_flops_dense": flops, "valid_keys": int(mask.sum()), **row})


# ------------------------------------------------------- threshold / sampler
def bench_threshold(shapes, dtype, copy_gbs, table, raw):
    compiled = torch.compile(quantile_threshold, dynamic=False)
    size = torch.finfo(dtype).bits // 8
    for shape in shapes:
        numel = torch.Size(shape).numel()
        copies = _copies(2 * numel * size)
        xs = [2 * torch.randn(shape, device="cuda", dtype=dtype) for _ in range(copies)]
        cands = {"triton": _triton(lambda i: ops.dynamic_threshold(xs[i], 0.995)),
                 "torch.quantile": lambda i: quantile_threshold(xs[i]),
                 "compile": lambda i: compiled(xs[i])}
        t = {k: _safe(lambda f=f: _bench(f, copies)) for k, f in cands.items()}
        _thr_row(table, raw, "dynamic_threshold", shape, dtype, t, 2 * numel * size, copy_gbs)


def bench_sampler(shapes, dtype, copy_gbs, table, raw):
    eager = eager_sampler_step()
    compiled = torch.compile(eager, dynamic=False)
    size = torch.finfo(dtype).bits // 8
    for shape in shapes:
        numel = torch.Size(shape).numel()
        copies = _copies(5 * numel * size)
        sets = [[torch.randn(shape, device="cuda", dtype=dtype) for _ in range(4)]
                for _ in range(copies)]
        cands = {
            "triton": _triton(lambda i: ops.sampler_step(
                *sets[i][:3], noise=sets[i][3], guidance_scale=5.0, alpha_t=0.6, sigma_t=0.8,
                alpha_s=0.8, sigma_s=0.6)),
            "torch.quantile": lambda i: eager(*sets[i]),
            "compile": lambda i: compiled(*sets[i]),
        }
        t = {k2: _safe(lambda f=f: _bench(f, copies)) for k2, f in cands.items()}
        _thr_row(table, raw, "sampler_step", shape, dtype, t, 5 * numel * size, copy_gbs)


def _thr_row(table, raw, op, shape, dtype, t, nbytes, copy_gbs):
    ours = _ms(t["triton"])
    gbs = nbytes / (ours * 1e-3) / 1e9
    table.add("x".join(map(str, shape)), str(dtype).replace("torch.", ""), ours,
              _ms(t["torch.quantile"]), _ms(t["compile"]), _ms(t["torch.quantile"]) / ours,
              _ms(t["compile"]) / ours, gbs, gbs / copy_gbs)
    raw.setdefault(op, []).append({"shape": list(shape), "dtype": str(dtype), "bytes": nbytes,
                                   **t})
    print(op, *table.rows[-1], flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few shapes (a smoke run)")
    ap.add_argument("--ops", default="gn,attn,thr,step")
    ap.add_argument("--out", default=None, help="results name (default triton_gpu_<gpu>)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    if ops.available_backends()["triton"] != "available":
        print("bench_triton_gpu: backend triton unavailable: "
              + ops.available_backends()["triton"], file=sys.stderr)
        return 2
    from imagen_fast.kernels.triton import _common as cm

    torch.manual_seed(0)
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(0)
    name = args.out or "triton_gpu_" + re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    copy_gbs = measure_copy_gbs()
    mm = measure_matmul_tflops()
    print(f"{gpu}: copy {copy_gbs:.0f} GB/s, bf16 matmul {mm:.0f} TFLOP/s", flush=True)
    machine = harness.machine_info(dev)
    machine.update(copy_gbs=round(copy_gbs, 1), matmul_bf16_tflops=round(mm, 1))
    import triton
    machine["triton"] = triton.__version__
    note = (f"do_bench medians (L2 flushed per call, inputs rotated); copy {copy_gbs:.0f} GB/s, "
            f"bf16 matmul {mm:.0f} TFLOP/s measured by this script; bf16 inputs.")
    sel = set(args.ops.split(","))
    quick = args.quick
    gcols = ["shape", "layout", "triton ms", "eager ms", "compile ms", "x eager", "x compile",
             "GB/s", "fraction of copy"]
    tcols = ["shape", "dtype", "triton ms", "torch.quantile ms", "compile ms", "x quantile",
             "x compile", "GB/s", "fraction of copy"]
    acols = ["shape", "pass", "triton masked ms", "SDPA masked ms", "compile masked ms",
             "x SDPA masked", "triton no-mask ms", "SDPA flash no-mask ms", "x flash",
             "TFLOP/s (masked)", "fraction of matmul"]
    tables, raw = [], {}
    bf16 = torch.bfloat16
    if "gn" in sel:
        tf = harness.Table("group_norm_silu forward (32 groups, FiLM, SiLU); bytes = 2 numel size",
                           gcols, notes=[note])
        tb = harness.Table("group_norm_silu backward alone (grads of x, w, b, scale, shift); "
                           "bytes = 3 numel size", gcols, notes=[note])
        bench_group_norm(GN_SHAPES[:2] if quick else GN_SHAPES, bf16, copy_gbs, tf, tb, raw)
        tables += [tf, tb]
    if "attn" in sel:
        ta = harness.Table("attention with key padding mask; FLOPs = 4 B H Lq Lk D (fwd), "
                           "3.5x for fwd+bwd", acols, notes=[note])
        bench_attention(ATTN_SHAPES[:2] if quick else ATTN_SHAPES, bf16, mm, ta, raw)
        tables.append(ta)
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
    raw["tuned_configs"] = {repr(k): repr(v) for k, v in cm.tuned_configs().items()}
    path = harness.write_results(name, machine, tables, raw)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
