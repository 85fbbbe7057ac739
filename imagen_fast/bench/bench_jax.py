"""The JAX path beside the torch path: training step and sampling throughput at one preset.

    python -m imagen_fast.bench.bench_jax [--preset base64-small-efficient] [--batch 8]
                                   [--steps 8] [--rounds 9] [--quick] [--no-torch]
                                   [--results-dir DIR]

Runs unchanged on a CPU machine and on a TPU host (``pip install -e ".[tpu]"``): the
JAX side uses every local device (a (data, 1) mesh, the batch split over it; on TPU
the Pallas kernels run, on CPU the jnp ops), the torch side the host CPU (skipped with
--no-torch, or by default when JAX is on an accelerator, where the comparison means
nothing). Measured:

  train   one training step: forward + loss + backward + AdamW(lr=1e-4), each library's
          own training path (torch: GaussianDiffusion.loss and torch.optim.AdamW; JAX:
          the jitted sharded step of ``imagen-fast train --backend jax``).
  sample  a whole guided sampling loop of --steps DDPM steps (guidance 5, dynamic
          thresholding p = 0.995), divided by the steps: torch's ``sample`` (one 2B
          forward + fused sampler_step per step) vs JAX's (one compiled lax.scan).
images/s = batch / time per (training or denoising) step. Both libraries run in one
process, interleaved round by round (``harness.compare``), median and p10/p90 over
rounds. The JAX compile time (first call) is reported apart and not in the timings.
Results: <results-dir>/bench_jax_<platform>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import torch

from imagen_fast.bench import bench_model, harness

TEXT_LEN = 64
GUIDANCE = 5.0
PERCENTILE = 0.995


def make_inputs(config, batch: int, seed: int = 0):
    """bench_model's inputs on the CPU: images, zero-padded text, mask, low-res or None."""
    return bench_model.make_inputs(config, batch, "cpu", seed)


def nhwc(t):
    return None if t is None else jnp.asarray(t.movedim(1, -1).contiguous().numpy())


# -------------------------------------------------------------------- torch
class TorchTrain:
    def __init__(self, preset, batch):
        from imagen_fast.diffusion import GaussianDiffusion
        from imagen_fast.models import build_unet
        torch.manual_seed(0)
        self.model = build_unet(preset).train()
        self.diffusion = GaussianDiffusion("cosine", cond_drop_prob=0.1,
                                           noise_aug=self.model.config["stage"] == "sr")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.images, self.text, self.mask, self.lowres = make_inputs(self.model.config, batch)
        self.gen = torch.Generator().manual_seed(1)

    def __call__(self, i=0):
        loss = self.diffusion.loss(self.model, self.images, self.text, self.mask, self.lowres,
                                   generator=self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class TorchSample:
    def __init__(self, preset, batch, steps):
        from imagen_fast.diffusion import GaussianDiffusion, sample
        from imagen_fast.models import build_unet
        torch.manual_seed(0)
        self.model = build_unet(preset).eval()
        c = self.model.config
        self.diffusion = GaussianDiffusion("cosine", noise_aug=c["stage"] == "sr")
        _, self.text, self.mask, self.lowres = make_inputs(c, batch)
        self.shape = (batch, 3, c["image_size"], c["image_size"])
        self.sample, self.steps = sample, steps

    @torch.no_grad()
    def __call__(self, i=0):
        return self.sample(self.model, self.diffusion, self.shape, text_embeds=self.text,
                           text_mask=self.mask, lowres=self.lowres, guidance=GUIDANCE,
                           sampler="ddpm", steps=self.steps, percentile=PERCENTILE,
                           generator=torch.Generator().manual_seed(i))


# ---------------------------------------------------------------------- JAX
def _jax_config(preset, batch):
    from imagen_fast.models import preset_config
    from imagen_fast.train_config import config_from_dict
    c = preset_config(preset)
    data = {"kind": "shapes", "path": "shapes:8", "resolution": c["image_size"],
            "lowres_resolution": c.get("lowres_size") or 0}
    return c, config_from_dict({
        "model": {"preset": preset}, "data": data,
        "train": {"batch_size": batch, "lr": 1e-4, "warmup_steps": 0, "ema_decay": 0.0,
                  "grad_clip": 0.0, "lr_schedule": "constant"}})


class JaxTrain:
    """The step of ``imagen-fast train --backend jax`` on a (devices, 1) mesh."""

    def __init__(self, preset, batch):
        from flax import nnx

        from imagen_fast.jax import sharding
        from imagen_fast.jax.diffusion import Diffusion
        from imagen_fast.jax.models import unet_from_config
        from imagen_fast.jax.optim import adamw_init
        from imagen_fast.jax.train import make_train_step
        from imagen_fast.train import build_diffusion
        config, cfg = _jax_config(preset, batch)
        devices = jax.devices()
        mesh = sharding.make_mesh(len(devices), 1, devices)
        model = unet_from_config(config)
        graphdef, params = nnx.split(model)
        state = {"params": params, "opt": adamw_init(params), "step": jnp.zeros((), jnp.int32)}
        shardings = sharding.tree_shardings(state, mesh)
        self.state = jax.device_put(state, shardings)
        images, text, mask, lowres = make_inputs(config, batch)
        batch_np = {"image": nhwc(images), "text": jnp.asarray(text.numpy()),
                    "mask": jnp.asarray(mask.numpy())}
        if lowres is not None:
            batch_np["lowres"] = nhwc(lowres)
        batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch_np.items()}
        self.batch = jax.device_put(batch_np, batch_sh)
        diffusion = Diffusion(build_diffusion(cfg, config["stage"]).config())
        self.step = jax.jit(make_train_step(graphdef, diffusion, cfg),
                            in_shardings=(shardings, batch_sh, sharding.replicated(mesh)),
                            out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
        self.lr = jnp.asarray(1e-4, jnp.float32)
        t0 = time.perf_counter()
        self(0)
        self.compile_s = time.perf_counter() - t0

    def __call__(self, i=0):
        self.state, metrics = self.step(self.state, self.batch, self.lr)
        metrics["loss"].block_until_ready()


class JaxSample:
    def __init__(self, preset, batch, steps):
        from imagen_fast.diffusion import GaussianDiffusion
        from imagen_fast.jax.diffusion import Diffusion, compile_sampler
        from imagen_fast.jax.models import build_unet
        model = build_unet(preset)
        c = model.config
        diffusion = Diffusion(GaussianDiffusion("cosine", noise_aug=c["stage"] == "sr").config())
        _, text, mask, lowres = make_inputs(c, batch)
        self.text, self.mask, self.lowres = (jnp.asarray(text.numpy()), jnp.asarray(mask.numpy()),
                                             nhwc(lowres))
        self.run = compile_sampler(model, diffusion, shape=(batch, c["image_size"], c["image_size"], 3),
                                   guidance=GUIDANCE, sampler="ddpm", steps=steps,
                                   percentile=PERCENTILE)
        t0 = time.perf_counter()
        self(0)
        self.compile_s = time.perf_counter() - t0

    def __call__(self, i=0):
        self.run(jax.random.key(i), self.text, self.mask, self.lowres).block_until_ready()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="base64-small-efficient")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="denoising steps of the sampled loop")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="tiny-base32, batch 2, 3 rounds")
    ap.add_argument("--no-torch", action="store_true", help="time the JAX path alone")
    ap.add_argument("--out", default=None, help="result name (default bench_jax_<platform>)")
    harness.add_results_arg(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.rounds, args.steps = "tiny-base32", 2, 3, 4
    platform = jax.default_backend()
    with_torch = not args.no_torch and platform == "cpu"
    if args.batch % jax.device_count():
        raise SystemExit(f"--batch {args.batch} must be divisible by the {jax.device_count()} devices")
    watch = harness.Watch()
    watch.start()
    load_before = os.getloadavg()
    runners = {"train": {"jax": JaxTrain(args.preset, args.batch)},
               "sample": {"jax": JaxSample(args.preset, args.batch, args.steps)}}
    compile_s = {mode: r["jax"].compile_s for mode, r in runners.items()}
    if with_torch:
        runners["train"]["torch"] = TorchTrain(args.preset, args.batch)
        runners["sample"]["torch"] = TorchSample(args.preset, args.batch, args.steps)
    timings, raw = {}, {}
    for mode, cands in runners.items():
        res = harness.compare(cands, rounds=args.rounds, min_round_s=0.0, warmup=1)
        for lib, t in res.items():
            per_step = t.median_ms / (args.steps if mode == "sample" else 1)
            timings[(lib, mode)] = (t, per_step)
            raw[f"{lib}/{mode}"] = t.as_dict()
    load_after = os.getloadavg()
    watch.stop()
    devices = jax.devices()
    table = harness.Table(
        f"{args.preset}, batch {args.batch}, {TEXT_LEN} text tokens: JAX on {len(devices)} x "
        f"{devices[0].device_kind} vs torch on the host CPU, median of {args.rounds} interleaved rounds",
        ["library", "mode", "ms per step (median)", "p10 ms", "p90 ms", "images/s",
         "JAX compile s", "JAX speedup vs torch"])
    for mode in ("train", "sample"):
        for lib in ("jax", "torch"):
            if (lib, mode) not in timings:
                continue
            t, per_step = timings[(lib, mode)]
            div = args.steps if mode == "sample" else 1
            speed = ""
            if lib == "jax" and ("torch", mode) in timings:
                speed = timings[("torch", mode)][1] / per_step
            table.add(lib, mode, per_step, t.p10_ms / div, t.p90_ms / div,
                      args.batch / (per_step / 1e3), compile_s[mode] if lib == "jax" else "", speed)
    table.notes += [
        "train: forward + loss + backward + AdamW step; sample: a guided DDPM loop of "
        f"{args.steps} steps (guidance {GUIDANCE}, dynamic thresholding p={PERCENTILE}) "
        "timed whole and divided by the steps; images/s per step.",
        f"JAX {jax.__version__} on {platform} ({'Pallas kernels' if platform == 'tpu' else 'jnp ops, XLA-fused'}); "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, imagen-fast op backends.",
        f"load average before/after: {tuple(round(x, 2) for x in load_before)} / "
        f"{tuple(round(x, 2) for x in load_after)} (this run's own threads included; whether "
        "other work ran is the machine line's busy verdict).",
    ]
    machine = dict(harness.machine_info(), jax=jax.__version__, jax_platform=platform,
                   jax_devices=f"{len(devices)} x {devices[0].device_kind}", **watch.fields())
    raw.update(compile_s=compile_s, load_before=load_before, load_after=load_after,
               preset=args.preset, batch=args.batch, steps=args.steps)
    path = harness.write_results(args.results_dir, args.out or f"bench_jax_{platform}", machine, [table], raw)
    print(table.markdown())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
