"""CPU kernels against PyTorch eager and torch.compile of the reference.

    python -m benchmarks.bench_cpu_ops [--quick] [--out NAME]

Bytes counted (the minimum any implementation must move): one read of each input
tensor and one write of each output, parameters ignored.
  group_norm_silu forward          read x, write y                         2 * numel * size
  group_norm_silu forward+backward forward, then read x, read dy, write dx 5 * numel * size
  dynamic_threshold                read x0, write out                      2 * numel * size
  sampler_step (guided, ddpm)      read z, cond, uncond, noise; write z_s  5 * numel * size
"Fraction of copy" divides the achieved GB/s by the machine's copy bandwidth
(dst.copy_(src), read + write), measured by this script at start.
Attention is compute-bound: FLOPs = 4 * B * H * Lq * Lk * D (the two matmuls), reported
as GFLOP/s and as a fraction of a 2048^3 float32 matmul's rate measured at start.
"""
from __future__ import annotations

import argparse
import os

from benchmarks import harness
from benchmarks.baselines import eager_group_norm, eager_sampler_step, quantile_threshold

harness.set_allocator_env()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from imagen_fast import ops  # noqa: E402
from imagen_fast.ops import reference  # noqa: E402

GN_SHAPES = [  # (N, C, H, W): feature maps of the presets' stages
    (8, 128, 64, 64),
    (8, 256, 32, 32),
    (8, 512, 16, 16),
    (8, 1024, 8, 8),
    (1, 64, 256, 256),
]
THRESH_SHAPES = [(8, 3, 64, 64), (8, 3, 256, 256)]


def _gn_inputs(shape, dtype, channels_last, copies, grad=False):
    n, c = shape[:2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(grad)
          for _ in range(copies)]
    gys = [torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt) for _ in range(copies)] if grad else None
    params = [torch.randn(c, dtype=dtype, requires_grad=grad), torch.randn(c, dtype=dtype, requires_grad=grad),
              (0.3 * torch.randn(n, c, dtype=dtype)).requires_grad_(grad),
              torch.randn(n, c, dtype=dtype, requires_grad=grad)]
    return xs, gys, params


def bench_group_norm(shapes, dtypes, rounds, copy_bw, table_f, table_fb, raw):
    compiled_fwd = torch.compile(reference.group_norm_silu, dynamic=False)
    for shape in shapes:
        for dtype in dtypes:
            for cl in (False, True):
                numel, size = torch.Size(shape).numel(), torch.finfo(dtype).bits // 8
                copies = harness.copies_for(2 * numel * size)
                xs, _, (w, b, s, sh) = _gn_inputs(shape, dtype, cl, copies)
                g = 32
                cand = {
                    "imagen_fast": lambda i: ops.group_norm_silu(xs[i % copies], g, w, b, scale=s, shift=sh),
                    "eager": lambda i: eager_group_norm(xs[i % copies], g, w, b, s, sh),
                    "compile": lambda i: compiled_fwd(xs[i % copies], g, w, b, 1e-5, s, sh, "silu"),
                }
                with torch.no_grad():
                    t = harness.compare(cand, rounds=rounds)
                _row(table_f, raw, "group_norm_silu fwd", shape, dtype, cl, t, 2 * numel * size, copy_bw)

                xs, gys, params = _gn_inputs(shape, dtype, cl, copies, grad=True)
                w, b, s, sh = params

                def fwd_bwd(fn):
                    def run(i):
                        y = fn(xs[i % copies])
                        torch.autograd.grad(y, [xs[i % copies], *params], gys[i % copies])
                    return run
                cand = {
                    "imagen_fast": fwd_bwd(lambda x: ops.group_norm_silu(x, g, w, b, scale=s, shift=sh)),
                    "eager": fwd_bwd(lambda x: eager_group_norm(x, g, w, b, s, sh)),
                    "compile": fwd_bwd(lambda x: compiled_fwd(x, g, w, b, 1e-5, s, sh, "silu")),
                }
                t = harness.compare(cand, rounds=rounds)
                _row(table_fb, raw, "group_norm_silu fwd+bwd", shape, dtype, cl, t, 5 * numel * size, copy_bw)


def _row(table, raw, op, shape, dtype, cl, t, nbytes, copy_bw):
    ours = t["imagen_fast"].median_ms
    gbs = nbytes / (ours * 1e-3) / 1e9
    layout = "NHWC" if cl else "NCHW"
    dt = str(dtype).replace("torch.", "")
    table.add("x".join(map(str, shape)), dt, layout, ours, t["eager"].median_ms,
              t["compile"].median_ms, t["eager"].median_ms / ours, t["compile"].median_ms / ours,
              gbs, gbs / copy_bw)
    raw.setdefault(op, []).append({"shape": list(shape), "dtype": dt, "layout": layout,
                                   "bytes": nbytes, **{k: v.as_dict() for k, v in t.items()}})
    print(op, *table.rows[-1], flush=True)


# shape B x H x Lq x Lk x D: image tokens of a 16x16 / 32x32 level attending to themselves plus
# the text tokens (base64-small's levels; text lengths 64 and 256 with padding).
ATTN_SHAPES = [(8, 4, 256, 256 + 64, 64), (8, 4, 1024, 1024 + 64, 64), (8, 4, 256, 256 + 256, 64)]


def bench_attention(shapes, rounds, mm_rate, table, raw):
    compiled = torch.compile(reference.attention, dynamic=False)
    for b, h, lq, lk, d in shapes:
        copies = harness.copies_for(4 * b * h * (lq + 2 * lk) * d)
        sets = [(torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d))
                for _ in range(copies)]
        mask = torch.rand(b, lk) > 0.3                 # padded text (and a few image tokens)
        mask[:, 0] = True
        sdpa_mask = mask[:, None, None, :]
        cand = {
            "imagen_fast": lambda i: ops.attention(*sets[i % copies], mask),
            "eager": lambda i: reference.attention(*sets[i % copies], mask),
            "compile": lambda i: compiled(*sets[i % copies], mask),
            "sdpa": lambda i: F.scaled_dot_product_attention(*sets[i % copies], attn_mask=sdpa_mask),
        }
        with torch.no_grad():
            t = harness.compare(cand, rounds=rounds)
        ours = t["imagen_fast"].median_ms
        gflops = 4 * b * h * lq * lk * d / (ours * 1e-3) / 1e9
        table.add(f"{b}x{h}x{lq}x{lk}x{d}", "float32", "BHLD", ours, t["eager"].median_ms,
                  t["compile"].median_ms, t["sdpa"].median_ms, t["eager"].median_ms / ours,
                  t["compile"].median_ms / ours, t["sdpa"].median_ms / ours, gflops, gflops / mm_rate)
        raw.setdefault("attention", []).append({"shape": [b, h, lq, lk, d], "flops": 4 * b * h * lq * lk * d,
                                                **{k: v.as_dict() for k, v in t.items()}})
        print("attention", *table.rows[-1], flush=True)


ATTN_COLUMNS = ["shape", "dtype", "layout", "ours ms", "eager ms", "compile ms", "SDPA ms",
                "x eager", "x compile", "x SDPA (same mask)", "GFLOP/s", "fraction of matmul"]


def bench_threshold(shapes, rounds, copy_bw, table, raw):
    compiled = torch.compile(quantile_threshold, dynamic=False)
    for shape in shapes:
        numel = torch.Size(shape).numel()
        copies = harness.copies_for(2 * numel * 4)
        xs = [2 * torch.randn(shape) for _ in range(copies)]
        cand = {
            "imagen_fast": lambda i: ops.dynamic_threshold(xs[i % copies], 0.995),
            "eager": lambda i: quantile_threshold(xs[i % copies]),
            "compile": lambda i: compiled(xs[i % copies]),
        }
        t = harness.compare(cand, rounds=rounds)
        _row(table, raw, "dynamic_threshold", shape, torch.float32, False, t, 2 * numel * 4, copy_bw)


def bench_sampler_step(shapes, rounds, copy_bw, table, raw):
    eager = eager_sampler_step()
    compiled = torch.compile(eager, dynamic=False)
    for shape in shapes:
        numel = torch.Size(shape).numel()
        copies = harness.copies_for(5 * numel * 4)
        sets = [[torch.randn(shape) for _ in range(4)] for _ in range(copies)]
        cand = {
            "imagen_fast": lambda i: ops.sampler_step(*sets[i % copies][:3], noise=sets[i % copies][3],
                                                      guidance_scale=5.0, alpha_t=0.6, sigma_t=0.8,
                                                      alpha_s=0.8, sigma_s=0.6),
            "eager": lambda i: eager(*sets[i % copies]),
            "compile": lambda i: compiled(*sets[i % copies]),
        }
        t = harness.compare(cand, rounds=rounds)
        _row(table, raw, "sampler_step", shape, torch.float32, False, t, 5 * numel * 4, copy_bw)


COLUMNS = ["shape", "dtype", "layout", "ours ms", "eager ms", "compile ms", "x eager", "x compile",
           "GB/s", "fraction of copy"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two shapes, few rounds (a smoke run)")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--out", default="cpu_ops", help="results name under benchmarks/results/")
    args = ap.parse_args(argv)
    threads = int(os.environ.get("IMAGEN_FAST_BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    rounds = 5 if args.quick else args.rounds
    gn_shapes = GN_SHAPES[2:4] if args.quick else GN_SHAPES
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]

    copy_bw = harness.measure_copy_bandwidth()
    mm_rate = harness.measure_matmul_rate()
    print(f"float32 matmul rate: {mm_rate:.1f} GFLOP/s", flush=True)
    print(f"copy bandwidth: {copy_bw:.2f} GB/s (read + write)", flush=True)
    machine = harness.machine_info()
    machine.update(copy_gbs=round(copy_bw, 3), matmul_gflops=round(mm_rate, 2),
                   backend_cpu=ops.available_backends()["cpu"])
    note = f"Medians of {rounds} interleaved rounds; copy bandwidth {copy_bw:.2f} GB/s; {threads} threads."
    t_f = harness.Table("group_norm_silu forward (GroupNorm 32 groups + FiLM + SiLU)", COLUMNS, notes=[note])
    t_fb = harness.Table("group_norm_silu forward + backward (grads of x, weight, bias, scale, shift)",
                         COLUMNS, notes=[note])
    t_th = harness.Table("dynamic_threshold p=0.995 (eager = torch.quantile)", COLUMNS, notes=[note])
    t_ss = harness.Table("sampler_step: guided DDPM step with dynamic thresholding", COLUMNS, notes=[note])
    raw: dict = {}
    bench_group_norm(gn_shapes, dtypes, rounds, copy_bw, t_f, t_fb, raw)
    bench_threshold(THRESH_SHAPES[-1:] if args.quick else THRESH_SHAPES, rounds, copy_bw, t_th, raw)
    bench_sampler_step(THRESH_SHAPES[-1:] if args.quick else THRESH_SHAPES, rounds, copy_bw, t_ss, raw)
    t_at = harness.Table("attention over image + text tokens with a key padding mask (forward)",
                         ATTN_COLUMNS, notes=[note.replace("copy bandwidth", "matmul "
                                                           f"{mm_rate:.1f} GFLOP/s; copy bandwidth")])
    bench_attention(ATTN_SHAPES[:1] if args.quick else ATTN_SHAPES, rounds, mm_rate, t_at, raw)
    # The host's memory bandwidth drifts (shared machine): measure again at the end and
    # state both; fractions above use the start value.
    copy_end = harness.measure_copy_bandwidth()
    machine.update(copy_gbs_end=round(copy_end, 3))
    for t in (t_f, t_fb, t_th, t_ss):
        t.notes.append(f"copy bandwidth re-measured at the end: {copy_end:.2f} GB/s")
    path = harness.write_results(args.out, machine, [t_f, t_fb, t_th, t_ss, t_at], raw)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    try:
        from benchmarks.plots import plot_speedups
        print(f"wrote {plot_speedups(path)}")
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")


if __name__ == "__main__":
    main()
