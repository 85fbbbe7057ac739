"""What the kernels buy inside the model, per CPU preset: the same U-Net on the package's
ops and on plain PyTorch ops, eager and under torch.compile, and the share of the step
spent in convolutions (which no norm or attention kernel touches).

    python -m imagen_fast.bench.bench_model_kernels [--quick] [--presets a,b] [--modes sample,train]
                                             [--batch B] [--rounds N] [--no-compile]
                                             [--no-profile] [--out NAME]

Variants (same weights and inputs, timed in one process, interleaved round by round by
imagen_fast/bench/harness.py; medians with 10th/90th percentiles):
  imagen-fast           the package as shipped: imagen_fast.ops with the automatic backend
                        (the CPU kernels of csrc/cpu, the variant IMAGEN_FAST_CPU_ISA picks)
  plain eager           the same model on plain PyTorch ops: F.group_norm + FiLM + F.silu,
                        F.scaled_dot_product_attention (imagen_fast/bench/baselines.plain_ops)
  plain compiled        that model under torch.compile (static shapes, fullgraph)
  imagen-fast compiled  the package's ops under torch.compile (its custom ops stay opaque
                        nodes of the graph; Inductor fuses what lies around them)
Modes:
  sample  one sampling step's guided forward: cond + uncond as one batch of 2B (what
          imagen_fast.diffusion.sample runs per step, minus the fused sampler step)
  train   forward + loss + backward + AdamW(lr=1e-4) step
Conv share: torch.profiler over one step of each variant: self CPU time of the
convolution ops (forward and backward) over the self CPU time of all ops.

Results: <--results-dir>/<out>.json and .md (machine named; a busy machine gives a
draft, see harness.Watch).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from typing import Callable, Dict, List, Optional


import torch  # noqa: E402

from imagen_fast.bench import harness  # noqa: E402
from imagen_fast.bench.baselines import plain_ops  # noqa: E402
from imagen_fast.bench.bench_model import CPU_PRESETS, GUIDANCE, PRESET_RUNS, _load_op_backends, make_inputs  # noqa: E402

VARIANTS = ("imagen-fast", "plain eager", "plain compiled", "imagen-fast compiled")
MODES = ("sample", "train")
QUICK_PRESET = "tiny-base32"


def _compiled(model):
    return torch.compile(model, dynamic=False, fullgraph=True)


def build_runners(preset: str, batch: int, mode: str, variants) -> Dict[str, Callable[[int], object]]:
    """variant -> fn(i) running one step of `mode` (own model copy per variant in training)."""
    from imagen_fast.diffusion import GaussianDiffusion, GuidedDenoiser
    from imagen_fast.models import build_unet, preset_config
    _load_op_backends()
    torch._dynamo.reset()      # a fresh compile cache per (preset, mode): no recompile limit hit
    torch.manual_seed(0)
    config = preset_config(preset)
    base = build_unet(preset).train(mode == "train")
    diffusion = GaussianDiffusion("cosine", cond_drop_prob=0.1, noise_aug=config["stage"] == "sr")
    images, text, mask, lowres = make_inputs(config, batch, torch.device("cpu"))
    runners = {}
    for variant in variants:
        ctx = plain_ops if variant.startswith("plain") else contextlib.nullcontext
        model = copy.deepcopy(base) if mode == "train" else base
        fn = _compiled(model) if variant.endswith("compiled") else model
        if mode == "sample":
            aug = None if lowres is None else torch.zeros(batch)
            denoise = GuidedDenoiser(fn, batch, text, mask, GUIDANCE, lowres, aug)
            z = torch.randn(images.shape, generator=torch.Generator().manual_seed(2))

            def run(i, denoise=denoise, z=z, ctx=ctx):
                with torch.no_grad(), ctx():
                    return denoise(z, 0.5)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            gen = torch.Generator().manual_seed(1)

            def run(i, fn=fn, opt=opt, gen=gen, ctx=ctx):
                with ctx():
                    loss = diffusion.loss(fn, images, text, mask, lowres, generator=gen)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                return loss.detach()
        runners[variant] = run
    return runners


def conv_share(fn: Callable[[int], object]) -> float:
    """Self CPU time of the convolution ops (forward and backward) over that of all ops,
    in one profiled step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(0)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key.lower())
    return conv / total if total else float("nan")


def run_case(preset: str, batch: int, mode: str, variants, rounds: int, profile_share: bool) -> List[dict]:
    runners = build_runners(preset, batch, mode, variants)
    first_s, failed, first_out = {}, {}, {}
    for name, fn in list(runners.items()):       # the first call compiles: timed apart
        t0 = time.perf_counter()
        try:
            first_out[name] = fn(0)
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported, not hidden
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            del runners[name]
            continue
        first_s[name] = time.perf_counter() - t0
    ref = first_out.get(variants[0])
    timings = harness.compare(runners, rounds=rounds, min_round_s=0.0, warmup=1)
    shares = {name: conv_share(fn) for name, fn in runners.items()} if profile_share else {}
    rows = []
    for name in variants:
        row = {"preset": preset, "mode": mode, "batch": batch, "variant": name}
        if name in failed:
            row["failed"] = failed[name]
        else:
            row.update(timings[name].as_dict(), first_call_s=round(first_s[name], 2),
                       conv_share=shares.get(name), max_abs_diff=_diff(first_out[name], ref))
        rows.append(row)
    return rows


def _diff(out, ref) -> Optional[float]:
    """Max |difference| of a variant's first result (the guided forward's two predictions,
    or the first training loss) from the first variant's: all run the same model."""
    if ref is None:
        return None
    a = torch.cat([t.flatten() for t in out if t is not None]) if isinstance(out, tuple) else out.flatten()
    b = torch.cat([t.flatten() for t in ref if t is not None]) if isinstance(ref, tuple) else ref.flatten()
    return float((a.double() - b.double()).abs().max())


def make_table(rows: List[dict], rounds: int, threads: int) -> harness.Table:
    table = harness.Table(
        f"Model step per CPU preset: the package's kernels against the same model on plain PyTorch "
        f"ops, eager and compiled; medians of {rounds} interleaved rounds, {threads} threads",
        ["preset", "mode", "batch", "variant", "ms (median)", "p10-p90 ms", "x plain eager",
         "conv share", "first call s", "max |diff| first call"])
    base = {(r["preset"], r["mode"]): r.get("median_ms") for r in rows if r["variant"] == "plain eager"}
    for r in rows:
        if "failed" in r:
            table.add(r["preset"], r["mode"], r["batch"], r["variant"], "n/a", "", "", "", "", "")
            table.notes.append(f"{r['preset']} {r['mode']} {r['variant']}: not run ({r['failed']})")
            continue
        ref = base.get((r["preset"], r["mode"]))
        share = r.get("conv_share")
        table.add(r["preset"], r["mode"], r["batch"], r["variant"], r["median_ms"],
                  f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f}", ref / r["median_ms"] if ref else "n/a",
                  "n/a" if share is None else f"{100 * share:.0f}%", r["first_call_s"],
                  "" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.2g}")
    table.notes += [
        "sample: one sampling step's guided forward (cond + uncond as one batch of 2B); train: "
        "forward + loss + backward + AdamW step.",
        "plain: F.group_norm + FiLM + F.silu and F.scaled_dot_product_attention with the boolean "
        "mask (imagen_fast/bench/baselines.plain_ops); compiled: torch.compile(model, dynamic=False, "
        "fullgraph=True), first call (compile) timed apart.",
        "conv share: self CPU time of convolution ops (forward and backward) over that of all ops "
        "in one profiled step (torch.profiler).",
        "max |diff| first call: of the first step's result (the two predictions, or the training "
        "loss) from imagen-fast's: the variants compute the same model.",
    ]
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: {QUICK_PRESET}, batch 1, 3 rounds, the sampling step only")
    ap.add_argument("--presets", default="", help=f"comma list (default {','.join(CPU_PRESETS)})")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    ap.add_argument("--batch", type=int, default=None, help="default: each preset's benchmark batch")
    ap.add_argument("--rounds", type=int, default=None, help="default 7 (quick: 3)")
    ap.add_argument("--no-compile", action="store_true", help="skip the two compiled variants")
    ap.add_argument("--no-profile", action="store_true", help="skip the convolution share")
    ap.add_argument("--out", default=None, help="results name (default bench_model_kernels_cpu)")
    harness.add_results_arg(ap)
    args = ap.parse_args(argv)
    from imagen_fast.models import PRESETS
    presets = [p for p in args.presets.split(",") if p] or ([QUICK_PRESET] if args.quick else list(CPU_PRESETS))
    modes = ["sample"] if args.quick and args.modes == ",".join(MODES) else [m for m in args.modes.split(",") if m]
    bad = sorted(set(presets) - set(PRESETS)) + sorted(set(modes) - set(MODES))
    if bad:
        ap.error(f"unknown presets or modes: {bad}")
    harness.set_allocator_env()
    threads = int(os.environ.get("IMAGEN_FAST_BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    rounds = args.rounds or (3 if args.quick else 7)
    variants = [v for v in VARIANTS if not (args.no_compile and v.endswith("compiled"))]
    watch = harness.Watch(threads=threads)
    watch.start()
    rows: List[dict] = []
    t0 = time.perf_counter()
    for preset in harness.progress(presets, desc="bench model kernels"):
        batch = args.batch or (1 if args.quick else PRESET_RUNS.get(preset, 8))
        for mode in modes:
            rows += run_case(preset, batch, mode, variants, rounds, not args.no_profile)
    watch.stop()
    machine = harness.machine_info()
    machine.update(watch.fields(), threads=threads, rounds=rounds, elapsed_s=round(time.perf_counter() - t0, 1),
                   quick=args.quick)
    table = make_table(rows, rounds, threads)
    path = harness.write_results(args.results_dir, args.out or "bench_model_kernels_cpu", machine, [table],
                                 {"rows": rows})
    print(table.markdown())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
