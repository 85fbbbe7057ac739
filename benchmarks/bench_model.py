"""U-Net training and sampling throughput and peak memory per preset, imagen-fast vs
imagen-pytorch at a matched configuration, on a CPU or a CUDA GPU.

    python -m benchmarks.bench_model [--device cpu|cuda] [--quick] [--presets a,b]
                                     [--memory-repeats N] [--budget-s S] [--quiet yes|no]

Each preset runs at its benchmark size (PRESET_RUNS: batch, 64 text tokens of its text
width with 8..64 valid per prompt, SR presets with their low-resolution image). A CPU
runs the small presets, a GPU the paper-size ones (bf16 autocast) and the matched one.
  train       one training step: forward + loss + backward + AdamW(lr=1e-4) step, through
              each library's own training path (GaussianDiffusion.loss / Imagen.forward);
              images/s = batch / step time
  sample      one guided denoising step (guidance 5, dynamic thresholding p = 0.995,
              ancestral): imagen-fast runs cond + uncond as ONE batch of 2B and the fused
              ops.sampler_step; imagen-pytorch's Imagen.p_sample runs its two forwards;
              images/s = batch / step time
  sample e2e  a whole sampling run of E2E_STEPS steps from noise (imagen_fast.diffusion
              .sample / Imagen.sample with timesteps = E2E_STEPS); images/s = batch / run time
  peak memory per (library, preset, mode), each in FRESH subprocesses (median of
              --memory-repeats, the range in the JSON), the first step included (so the
              optimizer state counts):
              * CPU, "RSS": peak resident set over the steps minus the resident set once
                model and inputs exist and torch._dynamo is imported (torch.library's
                custom ops import it on their first call: ~90 MiB of Python modules, once
                per process); the kernel's high-water mark is reset there; with
                glibc serving every block above 64 KiB by its own mmap so a free returns
                memory at once and the peak is not blurred by heap reuse;
              * CPU, "allocated": glibc's own high-water mark of those mmapped bytes
                (malloc_stats' "max mmap bytes") minus what was mapped at the start: bytes
                allocated, whether touched or not, independent of page residency;
              * GPU: torch.cuda.max_memory_allocated minus memory_allocated at the start.
Timings: the libraries compared run in one process, interleaved round by round
(harness.compare), medians with 10th/90th percentiles.

The matched configuration (issue 5): preset "base64-small-efficient" (21.7M params)
against imagen-pytorch's memory_efficient=True Unet (IP_UNET, 20.6M), 64x64, attention
with text at 16 and 8 px, the same text embeddings.

imagen-pytorch (2.1.0) comes with `make venv` (installed under constraints pinning this
torch); imagen_fast.patch._peers.import_imagen_pytorch imports it offline (torchvision's
meta registrations skipped, a local T5 config instead of the hub lookup; its T5 is never
run: the benchmark feeds precomputed text embeddings). Without imagen-pytorch the
benchmark runs imagen-fast alone and says why.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import harness  # noqa: E402
from imagen_fast.patch._peers import import_imagen_pytorch  # noqa: E402

TEXT_LEN = 64
GUIDANCE = 5.0
PERCENTILE = 0.995
MATCHED = "base64-small-efficient"
# preset -> benchmark batch (the paper-size ones only on a GPU)
PRESET_RUNS = {"base64-small-efficient": 8, "base64-small": 8, "tiny-base32": 8, "tiny-sr64": 8,
               "tiny-sr128": 8, "base64": 16, "sr256": 8, "sr1024": 2}
CPU_PRESETS = ("base64-small-efficient", "base64-small", "tiny-base32", "tiny-sr64", "tiny-sr128")
GPU_PRESETS = ("base64", "sr256", "sr1024", "base64-small-efficient")
E2E_STEPS = 10
MODES = ("train", "sample", "sample e2e")
# imagen-pytorch's memory-efficient Unet, attention + text at 16 and 8 px (its levels
# run at 32/16/8/4 px after the pre-downsampling), 20.6M parameters
IP_UNET = dict(dim=64, dim_mults=(1, 2, 3, 4), num_resnet_blocks=1, text_embed_dim=512,
               layer_attns=(False, True, True, False), layer_cross_attns=(False, True, True, False),
               memory_efficient=True, max_text_len=TEXT_LEN)
MMAP_THRESHOLD = 65536       # memory workers: every block above 64 KiB is its own mmap


# ------------------------------------------------------------------- inputs
def make_inputs(config: dict, batch: int, device, seed: int = 0):
    """images in [-1, 1], text (B, L, text_dim) zero-padded, mask, low-res image or None."""
    g = torch.Generator().manual_seed(seed)
    res = config["image_size"]
    images = torch.rand(batch, 3, res, res, generator=g) * 2 - 1
    text = torch.randn(batch, TEXT_LEN, config["text_dim"], generator=g)
    lengths = torch.randint(8, TEXT_LEN + 1, (batch,), generator=g)
    mask = torch.arange(TEXT_LEN)[None, :] < lengths[:, None]
    text = text * mask[..., None]
    lowres = None
    if config["stage"] == "sr":
        lr = config["lowres_size"]
        lowres = torch.rand(batch, 3, lr, lr, generator=g) * 2 - 1
    move = (lambda t: None if t is None else t.to(device))  # noqa: E731
    return move(images), move(text), move(mask), move(lowres)


def _autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------- imagen-fast
def _load_op_backends() -> None:
    """Import every op backend now (dispatch does it lazily on the first op call, which
    would otherwise count the import's memory as the first step's)."""
    from imagen_fast.ops import dispatch
    dispatch.available_backends()


class _Ours:
    def __init__(self, preset: str, batch: int, device, train: bool):
        _load_op_backends()
        from imagen_fast.diffusion import GaussianDiffusion
        from imagen_fast.models import build_unet, preset_config
        torch.manual_seed(0)
        self.device = device
        self.config = preset_config(preset)
        with torch.device(device):            # paper-size models: built in place on the GPU
            self.model = build_unet(preset).train(train)
        self.diffusion = GaussianDiffusion("cosine", cond_drop_prob=0.1,
                                           noise_aug=self.config["stage"] == "sr")
        self.images, self.text, self.mask, self.lowres = make_inputs(self.config, batch, device)
        self.gen = torch.Generator(device).manual_seed(1)


class OursTrain(_Ours):
    def __init__(self, preset, batch, device):
        super().__init__(preset, batch, device, True)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def __call__(self, i=0):
        with _autocast(self.device):
            loss = self.diffusion.loss(self.model, self.images, self.text, self.mask, self.lowres,
                                       generator=self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class OursSample(_Ours):
    def __init__(self, preset, batch, device):
        super().__init__(preset, batch, device, False)
        from imagen_fast import ops
        from imagen_fast.diffusion import GuidedDenoiser
        self.ops = ops
        aug = None if self.lowres is None else torch.zeros(batch, device=device)
        self.denoise = GuidedDenoiser(self.model, batch, self.text, self.mask, GUIDANCE, self.lowres, aug)
        self.z = torch.randn(self.images.shape, generator=torch.Generator().manual_seed(2)).to(device)
        a, s = self.diffusion.alpha_sigma(torch.tensor([0.5, 0.49], dtype=torch.float64))
        self.coefs = dict(alpha_t=float(a[0]), sigma_t=float(s[0]), alpha_s=float(a[1]), sigma_s=float(s[1]))

    @torch.no_grad()
    def __call__(self, i=0):
        with _autocast(self.device):
            cond, uncond = self.denoise(self.z, 0.5)
        return self.ops.sampler_step(self.z, cond, uncond, guidance_scale=GUIDANCE, sampler="ddpm",
                                     threshold="dynamic", percentile=PERCENTILE,
                                     generator=self.gen, **self.coefs)


class OursSampleE2E(_Ours):
    def __init__(self, preset, batch, device):
        super().__init__(preset, batch, device, False)
        from imagen_fast.diffusion import sample
        self.sample = sample

    def __call__(self, i=0):
        with _autocast(self.device):
            return self.sample(self.model, self.diffusion, tuple(self.images.shape),
                               text_embeds=self.text, text_mask=self.mask, lowres=self.lowres,
                               guidance=GUIDANCE, sampler="ddpm", steps=E2E_STEPS,
                               threshold="dynamic", percentile=PERCENTILE, generator=self.gen,
                               device=self.device)


def our_params(preset: str) -> int:
    from imagen_fast.models import count_parameters, preset_config
    return count_parameters(preset_config(preset))


# ---------------------------------------------------------- imagen-pytorch
class _IP:
    def __init__(self, preset: str, batch: int, device, train: bool, timesteps: int = 1000):
        from imagen_fast.models import preset_config
        ip = import_imagen_pytorch()
        torch.manual_seed(0)
        config = preset_config(preset)
        res = config["image_size"]
        self.device = device
        self.imagen = ip.Imagen(unets=(ip.Unet(**IP_UNET),), image_sizes=(res,),
                                text_embed_dim=config["text_dim"], timesteps=timesteps,
                                cond_drop_prob=0.1, dynamic_thresholding=True,
                                dynamic_thresholding_percentile=PERCENTILE).to(device)
        self.imagen.train(train)
        self.unet = self.imagen.unets[0]
        images, self.text, self.mask, _ = make_inputs(config, batch, device)
        self.images = (images + 1) / 2                       # imagen-pytorch takes [0, 1]
        self.batch = batch


class IPTrain(_IP):
    def __init__(self, preset, batch, device):
        super().__init__(preset, batch, device, True)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-4)

    def __call__(self, i=0):
        loss = self.imagen(self.images, text_embeds=self.text, text_masks=self.mask, unet_number=1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class IPSample(_IP):
    def __init__(self, preset, batch, device):
        super().__init__(preset, batch, device, False)
        self.unet.eval()
        self.z = torch.randn(self.images.shape, generator=torch.Generator().manual_seed(2)).to(device)
        self.t = torch.full((batch,), 0.5, device=device)
        self.t_next = torch.full((batch,), 0.49, device=device)

    @torch.no_grad()
    def __call__(self, i=0):
        return self.imagen.p_sample(self.unet, self.z, self.t, t_next=self.t_next,
                                    noise_scheduler=self.imagen.noise_schedulers[0],
                                    text_embeds=self.text, text_mask=self.mask, cond_scale=GUIDANCE,
                                    dynamic_threshold=True)


class IPSampleE2E(_IP):
    def __init__(self, preset, batch, device):
        super().__init__(preset, batch, device, False, timesteps=E2E_STEPS)

    def __call__(self, i=0):
        return self.imagen.sample(text_embeds=self.text, text_masks=self.mask, cond_scale=GUIDANCE,
                                  batch_size=self.batch, use_tqdm=False)


def ip_params() -> int:
    ip = import_imagen_pytorch()
    with torch.device("meta"):
        unet = ip.Unet(**IP_UNET)
    return sum(p.numel() for p in unet.parameters())


RUNNERS = {("imagen-fast", "train"): OursTrain, ("imagen-fast", "sample"): OursSample,
           ("imagen-fast", "sample e2e"): OursSampleE2E, ("imagen-pytorch", "train"): IPTrain,
           ("imagen-pytorch", "sample"): IPSample, ("imagen-pytorch", "sample e2e"): IPSampleE2E}


# ------------------------------------------------------------- peak memory
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024          # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water RSS (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _glibc_mmap_stats() -> Dict[str, float]:
    """glibc's mapped bytes now and their high-water mark, in MiB (malloc_stats prints
    the mark to stderr only: fd 2 is pointed at a file for the call)."""
    libc = ctypes.CDLL("libc.so.6")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                   "usmblks", "fsmblks", "uordblks", "fordblks",
                                                   "keepcost")]
    libc.mallinfo2.restype = MallInfo2
    now = libc.mallinfo2().hblkhd
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            libc.malloc_stats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode()
    peak = int(re.search(r"max mmap bytes\s*=\s*(\d+)", text).group(1))
    return {"mapped_mb": now / 2**20, "max_mapped_mb": peak / 2**20}


def memory_worker(lib: str, preset: str, mode: str, batch: int, steps: int, device) -> dict:
    """Peak memory over ``steps`` calls (the first included) over the state once model
    and inputs exist; run in a fresh process (see the module docstring)."""
    # torch.library custom ops import torch._dynamo (with sympy, ~90 MiB of Python
    # modules) on their first call: a one-time import of the process, not memory of a
    # step, so it is done before the baseline, for both libraries alike.
    import torch._dynamo  # noqa: F401
    run = RUNNERS[(lib, mode)](preset, batch, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for i in range(steps):
            run(i)
        torch.cuda.synchronize()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - start) / 2**20}
    malloc0 = _glibc_mmap_stats()
    reset = _reset_peak_rss()
    rss0 = _status_mb("VmRSS")
    for i in range(steps):
        run(i)
    peak = _status_mb("VmHWM")
    malloc1 = _glibc_mmap_stats()
    over_build = malloc1["max_mapped_mb"] > malloc0["max_mapped_mb"]
    return {"peak_mb": peak - rss0, "rss_start_mb": rss0, "peak_rss_mb": peak, "hwm_reset": reset,
            "allocated_peak_mb": (malloc1["max_mapped_mb"] - malloc0["mapped_mb"]) if over_build else None}


def measure_memory(lib: str, preset: str, mode: str, batch: int, steps: int, repeats: int,
                   device) -> dict:
    """Median (and range) of ``repeats`` fresh worker processes; GPU in process."""
    if device.type == "cuda":
        out = memory_worker(lib, preset, mode, batch, steps, device)
        gc.collect()
        torch.cuda.empty_cache()
        return {"peak_mb": out["peak_mb"], "runs": [out]}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_="131072",
               MALLOC_TOP_PAD_="0")
    cmd = [sys.executable, "-m", "benchmarks.bench_model", "--memory-worker", lib, preset, mode,
           "--batch", str(batch), "--memory-steps", str(steps)]
    runs = []
    for _ in range(repeats):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                             cwd=Path(__file__).resolve().parents[1])
        if out.returncode != 0:
            return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1], "runs": runs}
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    res = {"peak_mb": statistics.median(r["peak_mb"] for r in runs),
           "peak_mb_range": [min(r["peak_mb"] for r in runs), max(r["peak_mb"] for r in runs)],
           "runs": runs}
    alloc = [r["allocated_peak_mb"] for r in runs if r.get("allocated_peak_mb") is not None]
    res["allocated_peak_mb"] = statistics.median(alloc) if alloc else None
    return res


# ---------------------------------------------------------------------- main
def _imagen_pytorch_status():
    try:
        ip = import_imagen_pytorch()
        version = getattr(ip, "__version__", None)
        if version is None:
            from importlib.metadata import version as v
            version = v("imagen-pytorch")
        return True, f"available (version {version})", ip_params()
    except Exception as e:                                 # noqa: BLE001  (reported, not hidden)
        return False, f"not run: {type(e).__name__}: {e}", None


def main(argv=None) -> int:
    global E2E_STEPS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--presets", default="", help="comma list (default: per device)")
    ap.add_argument("--batch", type=int, default=None, help="override every preset's batch")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--quick", action="store_true",
                    help="matched preset at batch 2, no e2e, 3 rounds, one memory run (a smoke run)")
    ap.add_argument("--e2e-steps", type=int, default=E2E_STEPS, help="steps of the end-to-end sampling run")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--memory-repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new presets after this many seconds")
    ap.add_argument("--quiet", default="unknown", choices=["yes", "no", "unknown"],
                    help="record whether other work was paused on the machine during the run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--memory-worker", nargs=3, metavar=("LIB", "PRESET", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_model: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    torch.set_num_threads(int(os.environ.get("IMAGEN_FAST_BENCH_THREADS", os.cpu_count() or 1)))
    if args.memory_worker:
        lib, preset, mode = args.memory_worker
        print(json.dumps(memory_worker(lib, preset, mode, args.batch, args.memory_steps, device)))
        return 0
    harness.set_allocator_env()
    E2E_STEPS = args.e2e_steps
    from imagen_fast.models import PRESETS
    presets = [p for p in args.presets.split(",") if p] or list(
        CPU_PRESETS if device.type == "cpu" else GPU_PRESETS)
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        ap.error(f"--presets: unknown {unknown}")
    if args.quick:
        presets = presets[:1] if args.presets else [MATCHED]
    modes = MODES[:2] if args.quick else MODES
    rounds = args.rounds or (3 if args.quick else (15 if device.type == "cpu" else 20))
    repeats = 1 if args.quick else args.memory_repeats
    have_ip, ip_status, ip_n = _imagen_pytorch_status()

    t0 = time.perf_counter()
    load_before = os.getloadavg()
    throughput, memory, skipped, params = [], {}, [], {}
    for preset in harness.progress(presets, desc=f"bench model ({device.type})"):
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            skipped.append(f"{preset}: time budget")
            continue
        batch = args.batch or (2 if args.quick else PRESET_RUNS.get(preset, 8))
        libs = ["imagen-fast"] + (["imagen-pytorch"] if have_ip and preset == MATCHED else [])
        params[preset] = {"imagen-fast": our_params(preset)}
        if len(libs) > 1:
            params[preset]["imagen-pytorch"] = ip_n
        try:
            for mode in modes:
                runners = {lib: RUNNERS[(lib, mode)](preset, batch, device) for lib in libs}
                e2e = mode == "sample e2e"
                res = harness.compare({lib: (lambda i, r=r: r(i)) for lib, r in runners.items()},
                                      rounds=max(3, rounds // 4) if e2e else rounds,
                                      min_round_s=0.0, warmup=1 if e2e else 2, device=device)
                del runners
                for lib, t in res.items():
                    throughput.append({"preset": preset, "library": lib, "mode": mode, "batch": batch,
                                       "images_per_s": batch / (t.median_ms / 1e3),
                                       "steps": E2E_STEPS if e2e else 1, **t.as_dict()})
            for lib in libs:
                for mode in modes[:2]:
                    memory[f"{lib}/{preset}/{mode}"] = measure_memory(
                        lib, preset, mode, batch, args.memory_steps, repeats, device)
        except Exception as e:  # noqa: BLE001 - one preset failing (memory, say) must not lose the rest
            skipped.append(f"{preset}: {type(e).__name__}: {str(e)[:200]}")
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    load_after = os.getloadavg()
    machine = harness.machine_info(device)
    machine.update(quiet=args.quiet, elapsed_s=round(time.perf_counter() - t0, 1))
    table = _table(throughput, memory, params, device, rounds)
    table.notes += [
        f"imagen-pytorch: {ip_status}; compared at {MATCHED} (its Unet: {IP_UNET})",
        f"load average before/after: {tuple(round(x, 2) for x in load_before)} / "
        f"{tuple(round(x, 2) for x in load_after)}; quiet machine (other work paused): {args.quiet}",
    ] + [f"not run: {s}" for s in skipped]
    warning = None if device.type == "cuda" else harness.load_warning([load_before[0], load_after[0]])
    if warning:
        table.notes.append(warning)
    raw = {"throughput": throughput, "memory": memory, "params": params, "skipped": skipped,
           "imagen_pytorch": ip_status, "e2e_steps": E2E_STEPS, "load_before": load_before,
           "load_after": load_after}
    name = args.out or ("bench_model_cpu" if device.type == "cpu" else
                        "bench_model_gpu_"
                        + re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(0)).strip("_").lower())
    path = harness.write_results(name, machine, [table], raw)
    print(table.markdown())
    print(f"wrote {path}")
    try:
        from benchmarks.plots import plot_model
        print(f"wrote {plot_model(path)}")
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
    return 0


def _table(throughput: List[dict], memory: dict, params: dict, device, rounds: int) -> harness.Table:
    mem_cols = (["peak memory (MiB)"] if device.type == "cuda" else
                ["peak RSS over start (MiB, median)", "peak allocated (MiB)"])
    table = harness.Table(
        f"U-Net throughput per preset at its benchmark size ({TEXT_LEN} text tokens); per step "
        f"medians of {rounds} interleaved rounds (e2e: a {E2E_STEPS}-step sampling run)",
        ["preset", "library", "params (M)", "batch", "mode", "ms (median)", "p10 ms", "p90 ms",
         "images/s"] + mem_cols + ["x imagen-pytorch"])
    base = {(r["preset"], r["mode"]): r["median_ms"] for r in throughput if r["library"] == "imagen-pytorch"}
    for r in throughput:
        mem = memory.get(f"{r['library']}/{r['preset']}/{r['mode']}", {})
        mem_vals = [mem.get("peak_mb", "")] if device.type == "cuda" else [
            mem.get("peak_mb", ""), mem.get("allocated_peak_mb") or ""]
        ref = base.get((r["preset"], r["mode"]))
        table.add(r["preset"], r["library"], params[r["preset"]][r["library"]] / 1e6, r["batch"],
                  r["mode"], r["median_ms"], r["p10_ms"], r["p90_ms"], r["images_per_s"], *mem_vals,
                  ref / r["median_ms"] if ref else "")
    table.notes += [
        "train: forward + loss + backward + AdamW step; sample: one guided denoising step "
        f"(guidance {GUIDANCE}, dynamic thresholding p={PERCENTILE}); imagen-fast runs cond+uncond "
        "as one batch of 2B, imagen-pytorch as two forwards (its default).",
        "peak memory: fresh processes per (library, preset, mode), median; see the module "
        "docstring of benchmarks/bench_model.py for the two CPU measures.",
    ]
    return table


if __name__ == "__main__":
    sys.exit(main())
