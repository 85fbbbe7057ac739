"""U-Net training and sampling throughput on CPU, imagen-fast vs imagen-pytorch.

    python -m benchmarks.bench_model [--quick] [--batch 8] [--out NAME]

Measured, at a matched configuration (64x64 images, batch 8, 64 text tokens of width
512 with 8..64 valid per prompt, self-attention with text at 16 and 8 px, parameter
counts within 15%):
  train   one training step: forward + loss + backward + AdamW(lr=1e-4) step, in each
          library's own training path (GaussianDiffusion.loss / Imagen.forward);
          images/s = batch / step time.
  sample  one guided denoising step (guidance 5, dynamic thresholding at p = 0.995,
          ancestral): imagen-fast runs cond + uncond as one batch of 2B and the fused
          ops.sampler_step; imagen-pytorch's Imagen.p_sample runs its two forwards.
          images/s = batch / step time (per denoising step).
  peak memory  the process's peak RSS over the steps (the first included, so optimizer
          state counts) minus its RSS once model and inputs exist; each (library, mode)
          runs in a fresh subprocess, so one cannot inflate another.
Timings: both libraries in one process, interleaved round by round
(``harness.compare``), median and 10th/90th percentiles over rounds.

imagen-pytorch (2.1.0) comes with `make venv` (installed under constraints pinning this
torch); imagen_fast.patch._peers.import_imagen_pytorch imports it offline (torchvision's
meta registrations skipped, a local T5 config instead of the hub lookup). Without
imagen-pytorch the benchmark runs imagen-fast alone and says why.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks import harness

harness.set_allocator_env()

import torch  # noqa: E402

from imagen_fast.patch._peers import import_imagen_pytorch  # noqa: E402

RES = 64
TEXT_LEN = 64
TEXT_DIM = 512
GUIDANCE = 5.0
PERCENTILE = 0.995
OUR_PRESET = "base64-small-efficient"
# imagen-pytorch's memory-efficient Unet, attention + text at 16 and 8 px (its levels
# run at 32/16/8/4 px after the pre-downsampling), 20.6M parameters
IP_UNET = dict(dim=64, dim_mults=(1, 2, 3, 4), num_resnet_blocks=1, text_embed_dim=TEXT_DIM,
               layer_attns=(False, True, True, False), layer_cross_attns=(False, True, True, False),
               memory_efficient=True, max_text_len=TEXT_LEN)


# ------------------------------------------------------------------- inputs
def make_inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, RES, RES, generator=g)              # [0, 1]
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    lengths = torch.randint(8, TEXT_LEN + 1, (batch,), generator=g)
    mask = torch.arange(TEXT_LEN)[None, :] < lengths[:, None]
    text = text * mask[..., None]
    return images, text, mask


# ------------------------------------------------------------- imagen-fast
def _load_op_backends() -> None:
    """Import every op backend now (dispatch does it lazily on the first op call, which
    would otherwise count the import's memory as the first step's)."""
    from imagen_fast.ops import dispatch
    dispatch.available_backends()


class OursTrain:
    def __init__(self, batch):
        _load_op_backends()
        from imagen_fast.diffusion import GaussianDiffusion
        from imagen_fast.models import build_unet
        torch.manual_seed(0)
        self.model = build_unet(OUR_PRESET).train()
        self.diffusion = GaussianDiffusion("cosine", cond_drop_prob=0.1)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        images, self.text, self.mask = make_inputs(batch)
        self.images = images * 2 - 1
        self.gen = torch.Generator().manual_seed(1)

    def __call__(self, i=0):
        loss = self.diffusion.loss(self.model, self.images, self.text, self.mask, generator=self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class OursSample:
    def __init__(self, batch):
        _load_op_backends()
        from imagen_fast import ops
        from imagen_fast.diffusion import GaussianDiffusion, GuidedDenoiser
        from imagen_fast.models import build_unet
        torch.manual_seed(0)
        self.ops = ops
        self.model = build_unet(OUR_PRESET).eval()
        self.diffusion = GaussianDiffusion("cosine")
        _, text, mask = make_inputs(batch)
        self.denoise = GuidedDenoiser(self.model, batch, text, mask, GUIDANCE)
        self.z = torch.randn(batch, 3, RES, RES, generator=torch.Generator().manual_seed(2))
        self.gen = torch.Generator().manual_seed(3)
        a, s = self.diffusion.alpha_sigma(torch.tensor([0.5, 0.49], dtype=torch.float64))
        self.coefs = dict(alpha_t=float(a[0]), sigma_t=float(s[0]), alpha_s=float(a[1]), sigma_s=float(s[1]))

    @torch.no_grad()
    def __call__(self, i=0):
        cond, uncond = self.denoise(self.z, 0.5)
        return self.ops.sampler_step(self.z, cond, uncond, guidance_scale=GUIDANCE, sampler="ddpm",
                                     threshold="dynamic", percentile=PERCENTILE,
                                     generator=self.gen, **self.coefs)


def our_params() -> int:
    from imagen_fast.models import count_parameters, preset_config
    return count_parameters(preset_config(OUR_PRESET))


# ---------------------------------------------------------- imagen-pytorch
def _ip_imagen(batch, train: bool):
    ip = import_imagen_pytorch()
    torch.manual_seed(0)
    unet = ip.Unet(**IP_UNET)
    imagen = ip.Imagen(unets=(unet,), image_sizes=(RES,), text_embed_dim=TEXT_DIM, timesteps=1000,
                       cond_drop_prob=0.1, dynamic_thresholding=True,
                       dynamic_thresholding_percentile=PERCENTILE)
    imagen.train(train)
    return ip, imagen


class IPTrain:
    def __init__(self, batch):
        _, self.imagen = _ip_imagen(batch, True)
        self.unet = self.imagen.unets[0]
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-4)
        self.images, self.text, self.mask = make_inputs(batch)

    def __call__(self, i=0):
        loss = self.imagen(self.images, text_embeds=self.text, text_masks=self.mask, unet_number=1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class IPSample:
    def __init__(self, batch):
        _, self.imagen = _ip_imagen(batch, False)
        self.unet = self.imagen.unets[0].eval()
        _, self.text, self.mask = make_inputs(batch)
        self.z = torch.randn(batch, 3, RES, RES, generator=torch.Generator().manual_seed(2))
        self.t = torch.full((batch,), 0.5)
        self.t_next = torch.full((batch,), 0.49)

    @torch.no_grad()
    def __call__(self, i=0):
        return self.imagen.p_sample(self.unet, self.z, self.t, t_next=self.t_next,
                                    noise_scheduler=self.imagen.noise_schedulers[0],
                                    text_embeds=self.text, text_mask=self.mask, cond_scale=GUIDANCE,
                                    dynamic_threshold=True)


def ip_params() -> int:
    ip = import_imagen_pytorch()
    with torch.device("meta"):
        unet = ip.Unet(**IP_UNET)
    return sum(p.numel() for p in unet.parameters())


RUNNERS = {("imagen-fast", "train"): OursTrain, ("imagen-fast", "sample"): OursSample,
           ("imagen-pytorch", "train"): IPTrain, ("imagen-pytorch", "sample"): IPSample}


# ------------------------------------------------------------- peak memory
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024          # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    """This address space's high-water RSS. Not getrusage's ru_maxrss: that one keeps
    the parent's peak across fork + exec, so a worker would report the orchestrator's."""
    return _status_mb("VmHWM")


def memory_worker(lib: str, mode: str, batch: int, steps: int) -> dict:
    """Peak RSS over ``steps`` calls (the first one included: optimizer state and lazy
    buffers count) minus the RSS once the model and inputs exist."""
    run = RUNNERS[(lib, mode)](batch)
    before = _rss_mb()
    peak_before = _peak_rss_mb()
    for i in range(steps):
        run(i)
    peak = _peak_rss_mb()
    return dict(rss_before_mb=before, peak_rss_mb=peak, rss_after_mb=_rss_mb(),
                peak_over_start_mb=peak - max(before, peak_before))


def measure_memory(lib: str, mode: str, batch: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_model", "--memory-worker", lib, mode,
           "--batch", str(batch), "--memory-steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(),
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        return dict(error=out.stderr.strip().splitlines()[-1:] or ["failed"])
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="5 rounds, 2 memory steps")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--out", default="bench_model_cpu")
    ap.add_argument("--memory-worker", nargs=2, metavar=("LIB", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory rows (printed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker, args.batch, args.memory_steps)))
        return
    rounds = 5 if args.quick else args.rounds
    mem_steps = 2 if args.quick else args.memory_steps
    if args.memory_only:
        for lib in ("imagen-fast", "imagen-pytorch"):
            for mode in ("train", "sample"):
                print(lib, mode, measure_memory(lib, mode, args.batch, mem_steps))
        return

    libs = ["imagen-fast"]
    params = {"imagen-fast": our_params()}
    ip_status = "available"
    try:
        ip = import_imagen_pytorch()
        params["imagen-pytorch"] = ip_params()
        libs.append("imagen-pytorch")
        ip_version = getattr(ip, "__version__", None)
        if ip_version is None:
            from importlib.metadata import version
            ip_version = version("imagen-pytorch")
    except Exception as e:                                 # noqa: BLE001  (reported, not hidden)
        ip_status = f"not run: {type(e).__name__}: {e}"
        ip_version = None
    from imagen_fast import ops
    from imagen_fast.ops import dispatch
    probe = torch.randn(2, 64, 8, 8)
    backends = {op: dispatch.selected_backend(op, probe.device, *args_) for op, args_ in (
        ("group_norm_silu_fwd", (probe,)),
        ("attention_fwd", (torch.randn(1, 1, 4, 8),) * 3 + (None,)),
        ("sampler_step", (probe, probe, probe, None)))}
    del ops

    load_before = os.getloadavg()
    timings, raw = {}, {}
    for mode in ("train", "sample"):
        runners = {lib: RUNNERS[(lib, mode)](args.batch) for lib in libs}
        res = harness.compare({lib: (lambda i, r=r: r(i)) for lib, r in runners.items()},
                              rounds=rounds, min_round_s=0.0, warmup=2)
        for lib, t in res.items():
            timings[(lib, mode)] = t
            raw[f"{lib}/{mode}"] = t.as_dict()
        del runners
    load_after = os.getloadavg()
    memory = {f"{lib}/{mode}": measure_memory(lib, mode, args.batch, mem_steps)
              for lib in libs for mode in ("train", "sample")}
    raw["memory"] = memory

    table = harness.Table(
        f"U-Net {RES}x{RES}, batch {args.batch}, {TEXT_LEN} text tokens x {TEXT_DIM}: "
        f"per step, median of {rounds} interleaved rounds",
        ["library", "model", "params (M)", "mode", "step ms (median)", "p10 ms", "p90 ms",
         "images/s", "peak memory over start (MiB)", "speedup vs imagen-pytorch"])
    models = {"imagen-fast": OUR_PRESET, "imagen-pytorch": "Unet(memory_efficient=True)"}
    for mode in ("train", "sample"):
        for lib in libs:
            t = timings[(lib, mode)]
            mem = memory[f"{lib}/{mode}"].get("peak_over_start_mb", float("nan"))
            speed = ""
            if "imagen-pytorch" in libs:
                speed = timings[("imagen-pytorch", mode)].median_ms / t.median_ms
            table.add(lib, models[lib], params[lib] / 1e6, mode, t.median_ms, t.p10_ms, t.p90_ms,
                      args.batch / (t.median_ms / 1e3), mem, speed)
    table.notes += [
        "train: forward + loss + backward + AdamW step; sample: one guided denoising step "
        f"(guidance {GUIDANCE}, dynamic thresholding p={PERCENTILE}), images/s per step.",
        "imagen-fast runs cond+uncond as one batch of 2B; imagen-pytorch as two forwards "
        "(its default, with its parallel-component removal).",
        "peak memory: peak RSS over the steps (first included) minus RSS once model and "
        "inputs exist, fresh process per (library, mode).",
        f"imagen-pytorch: {ip_status}" + (f" (version {ip_version})" if ip_version else ""),
        f"imagen-fast op backends: {backends}",
        f"load average before/after timing: {tuple(round(x, 2) for x in load_before)} / "
        f"{tuple(round(x, 2) for x in load_after)} (the 2 cores are shared; interleaved "
        "rounds spread background load over both libraries)",
    ]
    raw.update(params=params, backends=backends, load_before=load_before, load_after=load_after,
               imagen_pytorch=ip_status, imagen_pytorch_config={k: list(v) if isinstance(v, tuple) else v
                                                                for k, v in IP_UNET.items()})
    path = harness.write_results(args.out, harness.machine_info(), [table], raw)
    print(table.markdown())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
