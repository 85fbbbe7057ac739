"""The op layer's own cost per call: imagen_fast.ops at tiny shapes, where a kernel has
next to nothing to do, against the bare CPU kernels and stock PyTorch.

    python -m imagen_fast.bench.bench_overhead [--quick] [--rounds N] [--out NAME]

Candidates per case, timed in one process, interleaved round by round (imagen_fast/bench/harness.py):
  op         imagen_fast.ops.<op> as a model calls it: argument checks, backend choice and,
             in eager mode, the backend's function called directly (an autograd.Function
             where gradients are wanted)
  custom op  the same call through its torch.library custom op and the custom op's autograd
             (forced with imagen_fast.ops.api.custom_ops_only): what torch.compile and
             torch.export graphs run, and what every eager call ran before the fast path
  kernel     the cpu backend's functions (imagen_fast/kernels/cpu.py) called directly with
             prepared arguments: no checks, no backend choice; forward+backward: inside a
             bare torch.autograd.Function (forward calls the forward function and keeps its
             outputs, backward calls the backward function), the least any autograd op pays
  kernel, no autograd   (forward+backward) the forward function, then the backward function
  torch      the stock PyTorch ops the op replaces (imagen_fast/bench/baselines.py)
overhead = op - kernel: what the op layer adds to each call (the same for custom op); the
autograd engine's own cost (kernel - kernel, no autograd) is not the op layer's.
Modes: forward (no input requires grad: sampling) and forward+backward (every input
requires grad; torch.autograd.grad from a given output gradient, so no .grad accumulates).
Inputs are not rotated over copies: tiny tensors stay in the L1 cache whatever one does,
and the fixed cost per call is what this measures. Threads: IMAGEN_FAST_BENCH_THREADS
(default every core), as in every benchmark; the kernels' parallel regions are part of
"kernel".

Results: <--results-dir>/<out>.json and .md (machine named; a busy machine gives a
draft, see harness.Watch).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional


import torch  # noqa: E402
from torch.autograd.function import once_differentiable  # noqa: E402

from imagen_fast.bench import harness  # noqa: E402
from imagen_fast.bench.baselines import (STEP, eager_chan_rms_norm, eager_group_norm, eager_sampler_step,  # noqa: E402
                                  plain_attention, quantile_threshold)

CANDIDATES = ("op", "custom op", "kernel", "torch")
BARE = "kernel, no autograd"      # forward+backward only
MODES = ("fwd", "fwd+bwd")
# group-norm calls the shipped cascade makes per 4-image sample (issue 21): the table's
# note turns the group-norm overhead into time per sample. Counted on the three-stage
# cascade at its defaults: 1856 (base, 64 guided steps) + 864 (64 px SR, 32 steps) + 93
# (256 px SR, 3 steps) = 2813.
GN_CALLS_PER_SAMPLE = 2800


@dataclass
class Case:
    name: str
    shape: str
    build: Callable[[str], Dict[str, Callable[[int], object]]]   # mode -> candidates
    modes: tuple


def _inputs(*shapes, grad: bool, dtype=torch.float32, channels_last=False):
    g = torch.Generator().manual_seed(0)
    out = []
    for s in shapes:
        t = torch.randn(*s, generator=g, dtype=torch.float32).to(dtype)
        if channels_last and t.ndim == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t.requires_grad_(grad))
    return out


def _grad_of(fn, leaves, gy):
    """fn() then autograd.grad of its output with the given output gradient."""
    return lambda i: torch.autograd.grad(fn(), leaves, gy)


class _BareFunction(torch.autograd.Function):
    """run_fwd(*inputs) -> (y, saved tensors); backward: run_bwd(grad_y, saved) -> the inputs'
    grads. What any correct autograd op does: tensors kept with save_for_backward (checked
    for in-place changes), a backward that refuses double differentiation."""

    @staticmethod
    def forward(ctx, run_fwd, run_bwd, *inputs):
        y, saved = run_fwd(*inputs)
        ctx.save_for_backward(*saved)
        ctx.run_bwd = run_bwd
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        return (None, None) + tuple(ctx.run_bwd(gy, ctx.saved_tensors))


def _kernel_candidates(run_fwd, run_bwd, leaves, gy) -> Dict[str, Callable[[int], object]]:
    """The kernel candidates of a forward+backward case: in a bare autograd.Function, and not."""
    detached = [t.detach() for t in leaves]

    def bare(i):
        y, saved = run_fwd(*detached)
        return run_bwd(gy, saved)
    return {"kernel": _grad_of(lambda: _BareFunction.apply(run_fwd, run_bwd, *leaves), leaves, gy), BARE: bare}


def _custom(fn):
    """fn through the custom ops (what compiled graphs run)."""
    from imagen_fast.ops.api import custom_ops_only

    def run(i):
        with custom_ops_only():
            return fn(i)
    return run


# ----------------------------------------------------------------------- the cases
def _gn_case(shape, groups, channels_last=False) -> Case:
    from imagen_fast import ops
    from imagen_fast.kernels import cpu as K

    n, c = shape[:2]

    def build(mode):
        grad = mode == "fwd+bwd"
        x, w, b, s, sh = _inputs(shape, (c,), (c,), (n, c), (n, c), grad=grad, channels_last=channels_last)
        op = lambda: ops.group_norm_silu(x, groups, w, b, scale=s, shift=sh)  # noqa: E731
        torch_ = lambda: eager_group_norm(x, groups, w, b, s, sh)  # noqa: E731
        xd, wd, bd, sd, shd = (t.detach() for t in (x, w, b, s, sh))
        if not grad:
            kern = lambda i: K.group_norm_silu_fwd(xd, groups, wd, bd, 1e-5, sd, shd, "silu")  # noqa: E731
            return {"op": lambda i: op(), "custom op": _custom(lambda i: op()), "kernel": kern,
                    "torch": lambda i: torch_()}
        gy = torch.randn_like(xd)
        leaves = [x, w, b, s, sh]
        needs = (True,) * 5

        def run_fwd(x, w, b, s, sh):
            y, mean, rstd = K.group_norm_silu_fwd(x, groups, w, b, 1e-5, s, sh, "silu")
            return y, (x, w, b, s, sh, mean, rstd)

        def run_bwd(g, saved):
            x, w, b, s, sh, mean, rstd = saved
            return K.group_norm_silu_bwd(g, x, mean, rstd, groups, w, b, s, sh, "silu", needs)
        return {"op": _grad_of(op, leaves, gy), "custom op": _custom(_grad_of(op, leaves, gy)),
                **_kernel_candidates(run_fwd, run_bwd, leaves, gy), "torch": _grad_of(torch_, leaves, gy)}

    name = "group_norm_silu" + (" channels-last" if channels_last else "")
    return Case(name, "x".join(map(str, shape)) + f" g{groups} w,b,FiLM", build, MODES)


def _rms_case(shape) -> Case:
    from imagen_fast import ops
    from imagen_fast.kernels import cpu as K

    n, c = shape[:2]

    def build(mode):
        grad = mode == "fwd+bwd"
        x, w, s, sh = _inputs(shape, (c,), (n, c), (n, c), grad=grad)
        eps = 1e-12
        op = lambda: ops.channel_rms_norm_silu(x, w, eps, s, sh)  # noqa: E731
        torch_ = lambda: eager_chan_rms_norm(x, w, s, sh)  # noqa: E731
        xd, wd, sd, shd = (t.detach() for t in (x, w, s, sh))
        if not grad:
            kern = lambda i: K.channel_rms_norm_silu_fwd(xd, wd, eps, sd, shd, "silu")  # noqa: E731
            return {"op": lambda i: op(), "custom op": _custom(lambda i: op()), "kernel": kern,
                    "torch": lambda i: torch_()}
        gy = torch.randn_like(xd)
        leaves = [x, w, s, sh]

        def run_fwd(x, w, s, sh):
            y, rstd = K.channel_rms_norm_silu_fwd(x, w, eps, s, sh, "silu")
            return y, (x, w, s, sh, rstd)

        def run_bwd(g, saved):
            x, w, s, sh, rstd = saved
            return K.channel_rms_norm_silu_bwd(g, x, rstd, w, eps, s, sh, "silu", (True,) * 4)
        return {"op": _grad_of(op, leaves, gy), "custom op": _custom(_grad_of(op, leaves, gy)),
                **_kernel_candidates(run_fwd, run_bwd, leaves, gy), "torch": _grad_of(torch_, leaves, gy)}

    return Case("channel_rms_norm_silu", "x".join(map(str, shape)) + " w,FiLM", build, MODES)


def _attn_case(b, h, lq, lk, d) -> Case:
    from imagen_fast import ops
    from imagen_fast.kernels import cpu as K

    def build(mode):
        grad = mode == "fwd+bwd"
        q, k, v = _inputs((b, h, lq, d), (b, h, lk, d), (b, h, lk, d), grad=grad)
        mask = torch.ones(b, lk, dtype=torch.bool)
        mask[0, lk // 2:] = False
        scale = 1.0 / math.sqrt(d)
        op = lambda: ops.attention(q, k, v, mask)  # noqa: E731
        torch_ = lambda: plain_attention(q, k, v, mask)  # noqa: E731
        # kernel: what the op runs in eager mode, the backend's differentiable attention
        # (with its own autograd); the custom op runs attention_fwd/_bwd instead.
        kern = lambda: K.attention(q, k, v, mask, scale)  # noqa: E731
        if not grad:
            return {"op": lambda i: op(), "custom op": _custom(lambda i: op()),
                    "kernel": lambda i: kern(), "torch": lambda i: torch_()}
        gy = torch.randn(b, h, lq, d)
        leaves = [q, k, v]
        qd, kd, vd = (t.detach() for t in leaves)

        def bare(i):
            out, lse = K.attention_fwd(qd, kd, vd, mask, scale)
            return K.attention_bwd(gy, qd, kd, vd, mask, out, lse, scale)
        return {"op": _grad_of(op, leaves, gy), "custom op": _custom(_grad_of(op, leaves, gy)),
                "kernel": _grad_of(kern, leaves, gy), BARE: bare, "torch": _grad_of(torch_, leaves, gy)}

    return Case("attention", f"{b}x{h}x{lq}x{lk}x{d} (BxHxLqxLkxD) masked", build, MODES)


def _threshold_case(shape) -> Case:
    from imagen_fast import ops
    from imagen_fast.kernels import cpu as K

    def build(mode):
        (x,) = _inputs(shape, grad=False)
        op = lambda i: ops.dynamic_threshold(x, 0.995)  # noqa: E731
        return {"op": op, "custom op": _custom(op), "kernel": lambda i: K.dynamic_threshold(x, 0.995, 1.0, math.inf),
                "torch": lambda i: quantile_threshold(x, 0.995)}

    return Case("dynamic_threshold", "x".join(map(str, shape)), build, ("fwd",))


def _step_case(shape, row: bool = False) -> Case:
    """The fused step given float times (the op computes the step's coefficients on the host)
    or, with row=True, a row of a coefficient table as the package's samplers call it
    (diffusion/step.py): then only the tensors' metadata is checked."""
    from imagen_fast import ops
    from imagen_fast.kernels import cpu as K

    def build(mode):
        z, cond, uncond, noise = _inputs(shape, shape, shape, shape, grad=False)
        times = {k: STEP[k] for k in ("alpha_t", "sigma_t", "alpha_s", "sigma_s")}
        coefs = ops.step_coefficients(*(torch.full((shape[0],), v, dtype=torch.float64) for v in times.values()))
        w = STEP["guidance_scale"]
        if row:   # a float64 row as diffusion/step.py passes it; the kernel gets it expanded to (N, 5)
            c = coefs[0]
            op = lambda i: ops.sampler_step(z, cond, uncond, guidance_scale=w, coefs=c, noise=noise)  # noqa: E731
            coefs = c.expand(shape[0], 5)
        else:
            op = lambda i: ops.sampler_step(z, cond, uncond, guidance_scale=w, noise=noise, **times)  # noqa: E731
        plain = eager_sampler_step()
        return {"op": op, "custom op": _custom(op),
                "kernel": lambda i: K.sampler_step(z, cond, uncond, w, coefs, noise, "dynamic", 0.995, 1.0),
                "torch": lambda i: plain(z, cond, uncond, noise)}

    how = "coefficient row (the samplers' call)" if row else "float times"
    return Case("sampler_step", "x".join(map(str, shape)) + f" guided ddpm, {how}", build, ("fwd",))


def build_cases(quick: bool) -> List[Case]:
    cases = [_gn_case((1, 32, 4, 4), 8), _rms_case((1, 32, 4, 4)), _attn_case(1, 2, 16, 8, 16),
             _threshold_case((1, 3, 8, 8)), _step_case((1, 3, 8, 8)), _step_case((1, 3, 8, 8), row=True)]
    if not quick:
        cases.insert(1, _gn_case((1, 32, 4, 4), 8, channels_last=True))
    return cases


# ----------------------------------------------------------------------- running
def run(cases: List[Case], rounds: int, min_round_s: float) -> List[dict]:
    rows = []
    for case in harness.progress(cases, desc="bench overhead"):
        for mode in case.modes:
            cands = case.build(mode)
            t = harness.compare(cands, rounds=rounds, min_round_s=min_round_s)
            us = {name: t[name].median_ms * 1e3 for name in cands}
            rows.append(dict(op=case.name, shape=case.shape, mode=mode,
                             **{f"{name}_us": round(v, 2) for name, v in us.items()},
                             overhead_us=round(us["op"] - us["kernel"], 2),
                             custom_op_overhead_us=round(us["custom op"] - us["kernel"], 2),
                             raw={name: t[name].as_dict() for name in cands}))
    return rows


def make_table(rows: List[dict], threads: int) -> harness.Table:
    table = harness.Table(
        title=f"Per-call cost at tiny shapes, microseconds (median; CPU, {threads} threads)",
        columns=["op", "shape", "mode", "op", "custom op", "kernel", BARE, "torch", "overhead = op - kernel",
                 "custom op - kernel"])
    for r in rows:
        table.add(r["op"], r["shape"], r["mode"], r["op_us"], r["custom op_us"], r["kernel_us"],
                  r.get(f"{BARE}_us", ""), r["torch_us"], r["overhead_us"], r["custom_op_overhead_us"])
    table.notes += [
        "op: imagen_fast.ops as models call it (eager fast path); custom op: the same call through its "
        "torch.library custom op (what compiled graphs run); kernel: the cpu backend's functions called "
        "directly; torch: the stock PyTorch ops (imagen_fast/bench/baselines.py).",
        "fwd+bwd: every input requires grad; torch.autograd.grad from a given output gradient. kernel: "
        "the backend's functions inside a bare torch.autograd.Function (attention: the backend's own "
        "differentiable eager path), the least an autograd op costs; kernel, no autograd: its forward "
        "then its backward function, called directly.",
    ]
    gn = next((r for r in rows if r["op"] == "group_norm_silu" and r["mode"] == "fwd"), None)
    if gn is not None:
        table.notes.append(
            f"{GN_CALLS_PER_SAMPLE} group-norm calls per 4-image sample of the shipped cascade x the forward "
            f"overhead: {GN_CALLS_PER_SAMPLE * gn['overhead_us'] / 1e3:.1f} ms per sample "
            f"(through the custom op: {GN_CALLS_PER_SAMPLE * gn['custom_op_overhead_us'] / 1e3:.1f} ms).")
    return table


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 5 rounds, no channels-last case")
    ap.add_argument("--rounds", type=int, default=None, help="default 21 (quick: 5)")
    ap.add_argument("--out", default=None, help="results name (default cpu_op_overhead)")
    harness.add_results_arg(ap)
    args = ap.parse_args(argv)
    harness.set_allocator_env()
    threads = int(os.environ.get("IMAGEN_FAST_BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    from imagen_fast.ops import dispatch
    status = dispatch.available_backends()["cpu"]
    if status != "available":
        raise SystemExit(f"bench_overhead measures the cpu backend, which is unavailable: {status}")
    from imagen_fast.kernels import cpu as K
    rounds = args.rounds or (5 if args.quick else 21)
    cases = build_cases(args.quick)
    watch = harness.Watch(threads=threads)
    watch.start()
    t0 = time.perf_counter()
    rows = run(cases, rounds, 0.01 if args.quick else 0.02)
    watch.stop()
    machine = harness.machine_info()
    machine.update(watch.fields(), threads=threads, rounds=rounds, cpu_kernels=K.cpu_isa(),
                   elapsed_s=round(time.perf_counter() - t0, 1), quick=args.quick)
    table = make_table(rows, threads)
    path = harness.write_results(args.results_dir, args.out or "cpu_op_overhead", machine, [table], {"rows": rows})
    print(table.markdown())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
