"""Eager vs torch.compile'd sampling and training: throughput, compile time, recompiles and
outputs compared, on a CPU or a CUDA GPU.

    python -m imagen_fast.bench.bench_compile [--device cpu|cuda] [--quick] [--presets a,b]
        [--modes default,reduce-overhead] [--batches 1,4] [--steps N] [--rounds N]
        [--repeats N] [--no-train] [--no-e2e] [--e2e-checkpoint DIR] [--backend B] [--budget-s S]
        [--quiet yes|no] [--out NAME] [--out-dir DIR]

What is measured, per preset and batch, for eager and each compile mode
(``imagen_fast.diffusion.sample(..., compile=mode)``: the whole guided step as one graph):
  sample run   a whole sampling run of --steps steps from noise (guidance 5, dynamic
               thresholding p = 0.995, ddpm): the first run (compile included; eager's
               first run pays its own one-time set-up) and steady runs, interleaved with
               eager round by round (harness.compare), medians with 10th/90th
               percentiles; steps/s = steps / run time, images/s = batch / run time
  train step   forward + loss + backward + AdamW step (``imagen_fast.train.training_loss``
               eager vs ``compiled_loss(mode)``), first step and steady steps, interleaved
  outputs      the compiled run's images against eager's from the same seed, and the
               first training loss against eager's on the same draws (max |difference|)
  recompiles   frames dynamo compiled during the case minus the compiled functions it
               made (each compiled step has its own code object): 0 means every later
               step and run reused its graph
  compile s    (CPU) in FRESH processes, first run minus steady run, with an empty
               inductor cache ("cold": a user's first call) and with the cache the cold
               process left ("warm": every later call); in-process numbers share caches
               between cases, so these are the ones to quote
On a CPU also the decision the CLI's default rests on: ``imagen-fast sample`` of 4 images
with the shipped cascade at its shipped settings, the pipeline call timed in fresh
processes (eager, compiled cold, compiled warm, --repeats times, medians): does the
compiled call, compile included, beat the eager one?

A GPU (--device cuda) runs the base preset (base64, bf16) at batches 1, 4 and 16, eager
vs "reduce-overhead" (the step captured as a CUDA graph) and eager vs "default", each its
own case in that order, sampling only, in one process (first run = compile + run),
within --budget-s: a case starts only if it should end in time and is written as soon as
it is done, so a time limit keeps what finished. benchmarks/gpu_session.sh runs it.

--quick is a smoke run (tests/bench/test_bench_compile.py): tiny-base32 at batch 1, two
steps, three rounds, in this process only (add --repeats 1 for one fresh-process repeat
and the e2e call at two steps per stage; --e2e-checkpoint DIR times another cascade).
--backend runs dynamo's capture with another backend (e.g. eager) instead of inductor:
for that smoke test only, its times mean nothing. This file is self-contained (the
harness aside).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

from imagen_fast.bench import harness
from imagen_fast.bench.bench_model import make_inputs

GUIDANCE = 5.0
PERCENTILE = 0.995
PROMPT = "two red circles above a blue square"
E2E_IMAGES = 4                     # `imagen-fast sample`'s default --num-images
# the shipped cascade's presets first, then bench_model's CPU presets; batch per preset
CPU_PRESETS = {"shapes-base32": 4, "shapes-sr64": 4, "base64-small-efficient": 8, "base64-small": 8,
               "tiny-base32": 8, "tiny-sr64": 8, "tiny-sr128": 8}
GPU_PRESETS = {"base64": None}
GPU_BATCHES = (1, 4, 16)


# ------------------------------------------------------------------- helpers
def compile_spec(mode: str, backend: Optional[str]):
    """What ``compile=`` gets: the mode, or with --backend a dict for that backend."""
    if mode == "none" or not backend:
        return mode
    return {"backend": backend}


def graph_counts(fns) -> Dict[str, int]:
    """Graphs dynamo holds for these compiled functions (one each, unless recompiled)."""
    from imagen_fast.diffusion.step import graphs_compiled
    n = [graphs_compiled(f) for f in fns]
    return {"graphs": sum(n), "recompiles": sum(k - 1 for k in n)}


def sampling_steps(model, spec) -> list:
    """The compiled steps ``sample(..., compile=spec)`` made for ``model``."""
    from imagen_fast.diffusion.step import compile_options, compiled_steps
    options = compile_options(spec)
    return [s for s in compiled_steps(model).values() if s.options == options]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Sampling:
    """Seeded sampling runs of one preset (the model built once, shared by every mode)."""

    def __init__(self, preset: str, batch: int, device, dtype, steps: int, model=None):
        from imagen_fast.diffusion import GaussianDiffusion
        from imagen_fast.models import build_unet, preset_config
        self.config = preset_config(preset)
        self.device, self.steps, self.batch = device, steps, batch
        if model is None:
            torch.manual_seed(0)
            with torch.device(device):
                model = build_unet(preset).to(dtype).eval()
        self.model = model
        self.diffusion = GaussianDiffusion(noise_aug=self.config["stage"] == "sr")
        _, self.text, self.mask, self.lowres = make_inputs(self.config, batch, device, dtype=dtype)
        self.shape = (batch, 3, self.config["image_size"], self.config["image_size"])
        self.dtype = dtype

    def run(self, compile, seed: int = 0):
        from imagen_fast.diffusion import sample
        g = torch.Generator(self.device).manual_seed(seed)
        return sample(self.model, self.diffusion, self.shape, text_embeds=self.text, text_mask=self.mask,
                      lowres=self.lowres, guidance=GUIDANCE, sampler="ddpm", steps=self.steps,
                      threshold="dynamic", percentile=PERCENTILE, generator=g, device=self.device,
                      dtype=self.dtype, compile=compile)


class Training:
    """Training steps of one preset with the loss eager or compiled (own model + AdamW)."""

    def __init__(self, preset: str, batch: int, device, compile):
        from imagen_fast.diffusion import GaussianDiffusion
        from imagen_fast.models import build_unet, preset_config
        from imagen_fast.train import compiled_loss
        config = preset_config(preset)
        torch.manual_seed(0)
        self.model = build_unet(preset).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.diffusion = GaussianDiffusion(noise_aug=config["stage"] == "sr")
        self.loss_fn = compiled_loss(compile)
        images, self.text, self.mask, self.lowres = make_inputs(config, batch, device, dtype=torch.float32)
        self.images = images.contiguous(memory_format=torch.channels_last)
        g = torch.Generator().manual_seed(1)
        self.draws = dict(t=torch.rand(batch, generator=g, dtype=torch.float64),
                          noise=torch.randn(self.images.shape, generator=g),
                          drop=torch.rand(batch, generator=g) < 0.1)
        if self.lowres is not None:
            self.draws.update(aug_level=torch.rand(batch, generator=g, dtype=torch.float64) * 0.5,
                              aug_noise=torch.randn(self.lowres.shape, generator=g))
        self.draws = {k: v.to(device) for k, v in self.draws.items()}

    def __call__(self, i=0) -> float:
        d = self.draws
        loss = self.loss_fn(self.diffusion, self.model, self.images, self.text, self.mask, self.lowres,
                            d["t"], d["noise"], d["drop"], d.get("aug_level"), d.get("aug_noise"))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


# ------------------------------------------------------------ one preset, in-process
def _first_runs(modes, backend, device, make_fn):
    """Per mode: the callable, its first call's seconds (compile + run) and output."""
    out = {}
    for mode in modes:
        fn = make_fn(mode, compile_spec(mode, backend))
        result = {"fn": fn}
        result["first_s"] = _timed(lambda: result.setdefault("output", fn()), device)
        out[mode] = result
    return out


def _rows(preset, batch, what, res, firsts, steps=None):
    """Table rows of one case: eager's, then each mode's (x eager, graphs, recompiles:
    counted after the timing rounds, so over every call of the case)."""
    rows = []
    eager_ms = res["none"].median_ms
    for mode, t in res.items():
        row = dict(preset=preset, batch=batch, what=what, mode=mode, first_s=firsts[mode]["first_s"],
                   images_per_s=batch / (t.median_ms / 1e3), x_eager=eager_ms / t.median_ms, **t.as_dict())
        if steps:
            row.update(steps=steps, steps_per_s=steps / (t.median_ms / 1e3))
        if mode != "none":
            row.update(graph_counts(firsts[mode]["compiled"]), max_abs_diff=firsts[mode]["diff"])
        rows.append(row)
    return rows


def bench_sampling(preset, batch, device, dtype, steps, modes, backend, rounds, model=None):
    """(rows, the model) of eager vs each mode's sampling runs."""
    case = Sampling(preset, batch, device, dtype, steps, model)
    firsts = _first_runs(("none",) + tuple(modes), backend, device,
                         lambda mode, spec: (lambda i=0: case.run(spec)))
    want = firsts["none"]["output"].float()
    res = harness.compare({m: f["fn"] for m, f in firsts.items()}, rounds=rounds, min_round_s=0.0,
                          warmup=1, device=device)
    for mode in modes:
        firsts[mode]["diff"] = float((firsts[mode]["output"].float() - want).abs().max())
        firsts[mode]["compiled"] = sampling_steps(case.model, compile_spec(mode, backend))
    return _rows(preset, batch, "sample run", res, firsts, steps), case.model


def bench_training(preset, batch, device, modes, backend, rounds) -> List[dict]:
    firsts = _first_runs(("none",) + tuple(modes), backend, device,
                         lambda mode, spec: Training(preset, batch, device, spec))
    want = float(firsts["none"]["output"])
    res = harness.compare({m: f["fn"] for m, f in firsts.items()}, rounds=rounds, min_round_s=0.0,
                          warmup=1, device=device)
    for mode in modes:
        firsts[mode]["diff"] = abs(float(firsts[mode]["output"]) - want)
        firsts[mode]["compiled"] = [firsts[mode]["fn"].loss_fn]
    return _rows(preset, batch, "train step", res, firsts)


# ----------------------------------------------------------- fresh-process workers
def _worker_compile(preset: str, batch: int, mode: str, backend: Optional[str], steps: int, what: str) -> dict:
    """First and second run (or training step) of one compiled preset in this process."""
    device = torch.device("cpu")
    spec = compile_spec(mode, backend)
    if what == "sample":
        case = Sampling(preset, batch, device, torch.float32, steps)
        fn = lambda: case.run(spec)  # noqa: E731
        compiled = lambda: sampling_steps(case.model, spec)  # noqa: E731
    else:
        runner = Training(preset, batch, device, spec)
        fn = runner
        compiled = lambda: [runner.loss_fn]  # noqa: E731
    t_first = _timed(fn, device)
    t_second = _timed(fn, device)
    return dict(first_s=t_first, second_s=t_second, compile_s=t_first - t_second, **graph_counts(compiled()))


def _worker_e2e(mode: str, backend: Optional[str], steps: Optional[int], save: str,
                checkpoint: Optional[str] = None) -> dict:
    """One `imagen-fast sample` call of 4 images with the shipped cascade (or another
    cascade directory), timed."""
    from imagen_fast.pipeline import load_pipeline
    t0 = time.perf_counter()
    pipe = load_pipeline(checkpoint, device="cpu", compile=compile_spec(mode, backend))
    t_load = time.perf_counter() - t0
    stages = []
    t1 = time.perf_counter()
    images = pipe([PROMPT], num_images_per_prompt=E2E_IMAGES, seed=0, return_tensors=True,
                  steps=steps, on_stage=lambda st, s: stages.append(s))
    call = time.perf_counter() - t1
    torch.save(images, save)
    compiled = [s for st in pipe.cascade.stages for s in sampling_steps(st.unet, compile_spec(mode, backend))]
    return dict(load_s=t_load, call_s=call, stage_s=stages, **graph_counts(compiled))


def _spawn(args: List[str], cache_dir: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    cmd = [sys.executable, "-m", "imagen_fast.bench.bench_compile", "--worker"] + args
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"worker {args} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def compile_times(preset, batch, mode, backend, steps, what, repeats) -> dict:
    """Cold and warm compile seconds of one preset in fresh processes (medians)."""
    cold, warm = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
            args = [what, preset, str(batch), mode, backend or "", str(steps)]
            cold.append(_spawn(args, cache))
            warm.append(_spawn(args, cache))
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    return dict(compile_cold_s=med(cold, "compile_s"), compile_warm_s=med(warm, "compile_s"),
                first_cold_s=med(cold, "first_s"), first_warm_s=med(warm, "first_s"),
                fresh_recompiles=max(r["recompiles"] for r in cold + warm))


def e2e_calls(modes, backend, steps, repeats, checkpoint=None) -> List[dict]:
    """The shipped cascade's `imagen-fast sample` call of 4 images: eager, and per mode
    compiled with a cold and a warm inductor cache, in fresh processes, rotated."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        runs: Dict[str, List[dict]] = {}

        def call(mode, cache, label):
            args = ["e2e", mode, backend or "", str(steps or 0), f"{tmp}/{mode}.pt", checkpoint or ""]
            runs.setdefault(label, []).append(_spawn(args, cache))

        for rep in range(repeats):
            order = ["none"] + list(modes)
            order = order[rep % len(order):] + order[:rep % len(order)]
            for mode in order:
                if mode == "none":
                    call(mode, f"{tmp}/cache-eager", "eager")
                    continue
                cache = f"{tmp}/cache-{mode}-{rep}"
                call(mode, cache, f"{mode} cold")
                call(mode, cache, f"{mode} warm")
        want = torch.load(f"{tmp}/none.pt").float()
        eager = statistics.median(r["call_s"] for r in runs["eager"])
        for name, rs in runs.items():
            call = statistics.median(r["call_s"] for r in rs)
            row = dict(what="imagen-fast sample, 4 images", mode=name, call_s=call,
                       call_min_s=min(r["call_s"] for r in rs), call_max_s=max(r["call_s"] for r in rs),
                       load_s=statistics.median(r["load_s"] for r in rs),
                       stage_s=[statistics.median(s) for s in zip(*(r["stage_s"] for r in rs))],
                       x_eager=eager / call, repeats=len(rs), graphs=rs[0]["graphs"],
                       recompiles=max(r["recompiles"] for r in rs))
            if name != "eager":
                mode = name.rsplit(" ", 1)[0]
                got = torch.load(f"{tmp}/{mode}.pt").float()
                row["max_abs_diff"] = float((got - want).abs().max())
            rows.append(row)
    return rows


# ---------------------------------------------------------------------- main
def _parse_list(text: str) -> List[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--presets", default="", help="comma list (default: per device)")
    ap.add_argument("--modes", default="", help="compile modes (default: cpu default; cuda default,reduce-overhead)")
    ap.add_argument("--batches", default="", help="comma list overriding the presets' batch (cuda: 1,4,16)")
    ap.add_argument("--steps", type=int, default=None, help="steps of a sampling run (cpu 10, cuda 20)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None,
                    help="fresh-process repeats (compile times, e2e; default 3, --quick 0 = none)")
    ap.add_argument("--e2e-checkpoint", default=None, help="cascade of the e2e call (default: the shipped one)")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--backend", default=None, help="dynamo backend instead of inductor (smoke tests)")
    ap.add_argument("--quick", action="store_true", help="a smoke run (see the module docstring)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for the whole run: a case starts only if it should end in time")
    ap.add_argument("--quiet", default="unknown", choices=["yes", "no", "unknown"],
                    help="record whether other work was paused on the machine during the run")
    ap.add_argument("--out", default=None, help="result file name (default bench_compile_<device>)")
    harness.add_results_arg(ap)
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        kind, rest = args.worker[0], args.worker[1:]
        if kind == "e2e":
            mode, backend, steps, save, checkpoint = rest
            out = _worker_e2e(mode, backend or None, int(steps) or None, save, checkpoint or None)
        else:
            preset, batch, mode, backend, steps = rest
            out = _worker_compile(preset, int(batch), mode, backend or None, int(steps), kind)
        print(json.dumps(out))
        return 0

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_compile: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    harness.set_allocator_env()
    from imagen_fast.models import PRESETS
    gpu = device.type == "cuda"
    table = CPU_PRESETS if not gpu else GPU_PRESETS
    presets = _parse_list(args.presets) or list(table)
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        ap.error(f"--presets: unknown {unknown}")
    modes = tuple(_parse_list(args.modes)) or (("default", "reduce-overhead") if gpu else ("default",))
    steps = args.steps or (20 if gpu else 10)
    rounds = args.rounds or (5 if gpu else 7)
    batches = [int(b) for b in _parse_list(args.batches)]
    repeats, e2e_steps = (3 if args.repeats is None else args.repeats), None
    if args.quick:
        presets, batches, steps, rounds, e2e_steps = ["tiny-base32"], [1], 2, 3, 2
        repeats = args.repeats or 0
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        torch.set_num_threads(int(os.environ.get("IMAGEN_FAST_BENCH_THREADS", os.cpu_count() or 1)))
    name = args.out or ("bench_compile_cpu" if not gpu else "bench_compile_gpu_" + re.sub(
        r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(0)).strip("_").lower())

    t0 = time.perf_counter()
    watch = harness.Watch(device)           # a busy run is written only as a draft
    watch.start()
    rows: List[dict] = []
    e2e: List[dict] = []
    skipped: List[str] = []

    last_case_s = [0.0]

    def over_budget() -> bool:
        """Whether the next case would end past --budget-s, judged by the last case's
        duration (compiling dominates a case, and costs about the same at every batch)."""
        elapsed = time.perf_counter() - t0
        return args.budget_s is not None and elapsed + last_case_s[0] > args.budget_s

    def write():
        watch.stop()                        # the probe at this point of the run
        machine = harness.machine_info(device)
        machine.update(watch.fields(), quiet=args.quiet, elapsed_s=round(time.perf_counter() - t0, 1),
                       compile_backend=args.backend or "inductor")
        tables = _tables(rows, e2e, steps, rounds, gpu, args.backend)
        notes = tables[0].notes
        notes.append(f"quiet machine (other work paused): {args.quiet}; busy: {machine['busy'] or 'no'}")
        notes += [f"not run: {s}" for s in skipped]
        raw = dict(rows=rows, e2e=e2e, skipped=skipped, steps=steps, rounds=rounds, modes=list(modes))
        return harness.write_results(args.results_dir, name, machine, tables, raw), tables

    for preset in harness.progress(presets, desc=f"bench compile ({device.type})"):
        model = None
        # a GPU measures one compile mode per case, CUDA graphs first (the number that
        # matters most), so a time limit keeps whole comparisons; a CPU all modes at once
        cases = [(batch, case_modes) for batch in batches or [table.get(preset) or CPU_PRESETS.get(preset, 4)]
                 for case_modes in (sorted(((m,) for m in modes), key=lambda m: m[0] == "default")
                                    if gpu else [modes])]
        for batch, case_modes in cases:
            label = f"{preset} batch {batch} {'/'.join(case_modes)}"
            if over_budget():
                skipped.append(f"{label}: time budget")
                continue
            case_t0 = time.perf_counter()
            try:
                sampled, model = bench_sampling(preset, batch, device, dtype, steps, case_modes, args.backend,
                                                rounds, model)
                rows += sampled
                if gpu:
                    torch.cuda.empty_cache()
                elif not args.no_train:
                    rows += bench_training(preset, batch, device, case_modes, args.backend, rounds)
                if not gpu and repeats:
                    whats = ("sample",) if args.no_train or args.quick else ("sample", "train")
                    for mode in case_modes:
                        for what in whats:
                            ct = compile_times(preset, batch, mode, args.backend, steps, what, repeats)
                            for r in rows:
                                if (r["preset"], r["batch"], r["mode"], r["what"].split()[0]) == \
                                        (preset, batch, mode, what):
                                    r.update(ct)
            except Exception as e:  # noqa: BLE001 - one case failing must not lose the others
                skipped.append(f"{label}: {type(e).__name__}: {str(e)[:300]}")
            last_case_s[0] = time.perf_counter() - case_t0
            write()
    if not gpu and not args.no_e2e and repeats and not over_budget():
        try:
            e2e = e2e_calls(modes, args.backend, e2e_steps, repeats, args.e2e_checkpoint)
        except Exception as e:  # noqa: BLE001
            skipped.append(f"e2e: {type(e).__name__}: {str(e)[:300]}")
    path, tables = write()
    for t in tables:
        print(t.markdown())
    print(f"wrote {path}")
    return 0


def _tables(rows, e2e, steps, rounds, gpu, backend) -> List[harness.Table]:
    fmt = lambda v: "" if v is None else v  # noqa: E731
    t = harness.Table(
        f"Eager vs compiled (one graph per step) per preset; a sampling run is {steps} guided "
        f"steps (guidance {GUIDANCE}, dynamic thresholding); medians of {rounds} interleaved rounds",
        ["preset", "batch", "what", "mode", "ms (median)", "p10 ms", "p90 ms", "steps/s", "images/s",
         "x eager", "first run/step s", "compile s cold", "compile s warm", "graphs", "recompiles",
         "max |diff| vs eager"])
    for r in rows:
        t.add(r["preset"], r["batch"], r["what"], r["mode"], r["median_ms"], r["p10_ms"], r["p90_ms"],
              fmt(r.get("steps_per_s")), r["images_per_s"], r["x_eager"], r["first_s"],
              fmt(r.get("compile_cold_s")), fmt(r.get("compile_warm_s")), fmt(r.get("graphs")),
              fmt(max(r["recompiles"], r.get("fresh_recompiles", 0)) if "recompiles" in r else None),
              fmt(r.get("max_abs_diff")))
    t.notes += [
        "mode none = eager; first run/step s: compile + one run (in-process; caches shared between "
        "cases); compile s cold/warm: fresh processes with an empty / a reused inductor cache "
        "(first run minus second run); graphs: what dynamo holds for the case's compiled functions "
        "after every call; recompiles: graphs beyond one per compiled function, in this process or "
        "the fresh ones (0 = one graph served every step and run)",
        "max |diff|: sampling images vs eager from the same seed; training: first loss vs eager's",
    ]
    if backend:
        t.notes.append(f"backend {backend}, not inductor: a smoke run, the times mean nothing")
    tables = [t]
    if e2e:
        e = harness.Table(
            "`imagen-fast sample` of 4 images with the shipped cascade at its shipped settings: the "
            "pipeline call in fresh processes (compile included), medians",
            ["mode", "call s", "min s", "max s", "stage s", "x eager", "graphs", "recompiles",
             "max |diff| vs eager"])
        for r in e2e:
            e.add(r["mode"], r["call_s"], r["call_min_s"], r["call_max_s"],
                  " / ".join(f"{s:.2f}" for s in r["stage_s"]), r["x_eager"], r["graphs"], r["recompiles"],
                  fmt(r.get("max_abs_diff")))
        eager = next(r["call_s"] for r in e2e if r["mode"] == "eager")
        for r in e2e:
            if r["mode"] != "eager":
                e.notes.append(f"{r['mode']}: compiling {'PAYS' if r['call_s'] <= eager else 'does not pay'} "
                               f"within one call ({r['call_s']:.2f} s vs eager {eager:.2f} s)")
        tables.append(e)
    return tables


if __name__ == "__main__":
    sys.exit(main())
