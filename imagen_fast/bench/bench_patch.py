"""imagen_fast.accelerate on models built elsewhere: patched vs unpatched, on CPU.

    python -m imagen_fast.bench.bench_patch [--quick] [--rounds 9] [--out NAME] [--quiet yes|no]
                                            [--results-dir DIR]

Two libraries, two modes each; the unpatched model and an accelerated deep copy of
it (same weights) run in one process, interleaved round by round
(``harness.compare``), median and 10th/90th percentiles over rounds:
  diffusers   a DeepFloyd IF stage-I-style UNet2DConditionModel (scale-shift GELU
              resnets, SimpleCrossAttn blocks with the text concatenated to the keys,
              text padding mask), random weights, 64x64.
              train:  forward + MSE loss + backward + SGD step (an optimizer whose
                      cost, the same for both, does not drown the difference).
              sample: one guided step: the UNet on cond + uncond (batch 2B) and
                      DDPMScheduler.step with IF's thresholding (ratio 0.95,
                      sample_max_value 1.5); the patched run also has the scheduler
                      accelerated.
  imagen-pytorch  the memory-efficient Unet of imagen_fast/bench/bench_model.py at half its
              width (dim 32; 64x64, attention + text at 16 and 8 px).
              train:  Imagen.forward (its loss) + backward + SGD step.
              sample: Imagen.p_sample, guidance 5, dynamic thresholding (p = 0.995).
Before timing, each pair's outputs are compared (max |patched - unpatched|, noted).
"""
from __future__ import annotations

import argparse
import copy
import os

import torch

import imagen_fast
from imagen_fast.bench import harness
from imagen_fast.bench.bench_model import IP_UNET, PERCENTILE, make_inputs
from imagen_fast.patch._peers import import_imagen_pytorch

RES = 64
GUIDANCE = 5.0
TEXT_DIM = IP_UNET["text_embed_dim"]
IF_TEXT_DIM, IF_TEXT_LEN = 256, 32
IF_UNET = dict(
    sample_size=RES, in_channels=3, out_channels=6, block_out_channels=(32, 64, 128),
    layers_per_block=1, attention_head_dim=32, norm_num_groups=32, cross_attention_dim=128,
    encoder_hid_dim=IF_TEXT_DIM, addition_embed_type="text", addition_embed_type_num_heads=4,
    resnet_time_scale_shift="scale_shift", act_fn="gelu", cross_attention_norm="group_norm",
    resnet_skip_time_act=True, resnet_out_scale_factor=1.414, only_cross_attention=False,
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                      "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                    "ResnetUpsampleBlock2D"),
)
# bench_model's imagen-pytorch Unet at half the width (the shared 2-core machine is slow)
IP_SMALL = dict(IP_UNET, dim=32)
IF_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", thresholding=True,
                    dynamic_thresholding_ratio=0.95, sample_max_value=1.5, clip_sample=True,
                    variance_type="learned_range")


# ------------------------------------------------------------------ diffusers
def _if_inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, RES, RES, generator=g)
    text = torch.randn(batch, IF_TEXT_LEN, IF_TEXT_DIM, generator=g)
    lengths = torch.randint(4, IF_TEXT_LEN + 1, (batch,), generator=g)
    mask = torch.arange(IF_TEXT_LEN)[None, :] < lengths[:, None]
    return x, text, mask


class DiffusersTrain:
    def __init__(self, unet, batch):
        self.unet = unet.train()
        self.opt = torch.optim.SGD(self.unet.parameters(), lr=1e-4)
        self.x, self.text, self.mask = _if_inputs(batch)
        self.t = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(1))
        self.target = torch.randn(batch, 6, RES, RES, generator=torch.Generator().manual_seed(2))

    def __call__(self, i=0):
        out = self.unet(self.x, self.t, encoder_hidden_states=self.text,
                        encoder_attention_mask=self.mask).sample
        loss = torch.nn.functional.mse_loss(out, self.target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return out


class DiffusersSample:
    def __init__(self, unet, batch, accelerated):
        from diffusers import DDPMScheduler
        self.unet = unet.eval()
        self.sched = DDPMScheduler(**IF_SCHEDULER)
        self.sched.set_timesteps(50)
        if accelerated:
            imagen_fast.accelerate(self.sched)
        self.x, text, mask = _if_inputs(batch)
        self.text = torch.cat([text, torch.zeros_like(text)])          # cond + uncond
        self.mask = torch.cat([mask, torch.zeros_like(mask)])
        self.t = self.sched.timesteps[10]

    @torch.no_grad()
    def __call__(self, i=0):
        out = self.unet(torch.cat([self.x, self.x]), self.t, encoder_hidden_states=self.text,
                        encoder_attention_mask=self.mask).sample
        cond, uncond = out.chunk(2)
        eps_c, var = cond.split(3, dim=1)
        eps = uncond[:, :3] + GUIDANCE * (eps_c - uncond[:, :3])
        guided = torch.cat([eps, var], dim=1)
        return self.sched.step(guided, self.t, self.x,
                               generator=torch.Generator().manual_seed(i)).prev_sample


def diffusers_pair(mode, batch):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**IF_UNET)
    fast = copy.deepcopy(unet)
    report = imagen_fast.accelerate(fast)
    if mode == "train":
        return DiffusersTrain(unet, batch), DiffusersTrain(fast, batch), report, unet
    return DiffusersSample(unet, batch, False), DiffusersSample(fast, batch, True), report, unet


# -------------------------------------------------------------- imagen-pytorch
def _ip_inputs(batch):
    """bench_model's images, text embeddings and mask at this benchmark's size."""
    config = dict(image_size=RES, text_dim=TEXT_DIM, stage="base")
    return make_inputs(config, batch, torch.device("cpu"))[:3]


def _imagen(train):
    ip = import_imagen_pytorch()
    torch.manual_seed(0)
    imagen = ip.Imagen(unets=(ip.Unet(**IP_SMALL),), image_sizes=(RES,), text_embed_dim=TEXT_DIM,
                       timesteps=1000, cond_drop_prob=0.1, dynamic_thresholding=True,
                       dynamic_thresholding_percentile=PERCENTILE)
    return imagen.train(train)


class IPTrain:
    def __init__(self, imagen, batch):
        self.imagen = imagen
        self.opt = torch.optim.SGD(imagen.unets[0].parameters(), lr=1e-4)
        self.images, self.text, self.mask = _ip_inputs(batch)

    def __call__(self, i=0):
        torch.manual_seed(i)            # the same noise and times for both variants
        loss = self.imagen(self.images, text_embeds=self.text, text_masks=self.mask, unet_number=1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


class IPSample:
    def __init__(self, imagen, batch):
        self.imagen = imagen.eval()
        _, self.text, self.mask = _ip_inputs(batch)
        self.z = torch.randn(batch, 3, RES, RES, generator=torch.Generator().manual_seed(2))
        self.t = torch.full((batch,), 0.5)

    @torch.no_grad()
    def __call__(self, i=0):
        torch.manual_seed(i)
        return self.imagen.p_sample(self.imagen.unets[0], self.z, self.t, t_next=self.t - 0.01,
                                    noise_scheduler=self.imagen.noise_schedulers[0],
                                    text_embeds=self.text, text_mask=self.mask,
                                    cond_scale=GUIDANCE, dynamic_threshold=True)[0]


def imagen_pytorch_pair(mode, batch):
    imagen = _imagen(mode == "train")
    fast = _imagen(mode == "train")           # Imagen holds TorchScript functions: no deepcopy
    fast.load_state_dict(imagen.state_dict())
    report = imagen_fast.accelerate(fast)
    cls = IPTrain if mode == "train" else IPSample
    return cls(imagen, batch), cls(fast, batch), report, imagen.unets[0]


# ----------------------------------------------------------------------- main
def _agreement(slow, fast) -> float:
    """max |patched - unpatched| of one call from identical states (before timing)."""
    a, b = slow(0), fast(0)
    return (a.float() - b.float()).abs().max().item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 rounds")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default="bench_patch_cpu", help="results name")
    harness.add_results_arg(ap)
    ap.add_argument("--quiet", default="unknown", choices=["yes", "no", "unknown"],
                    help="record whether other work was paused on the machine during the run")
    args = ap.parse_args(argv)
    harness.set_allocator_env()
    torch.set_num_threads(os.cpu_count() or 1)
    rounds = 3 if args.quick else args.rounds
    pairs = {"diffusers": diffusers_pair, "imagen-pytorch": imagen_pytorch_pair}
    table = harness.Table(
        f"imagen_fast.accelerate, {RES}x{RES}, batch {args.batch}: per step, median of "
        f"{rounds} interleaved rounds",
        ["library", "model", "params (M)", "mode", "unpatched ms", "patched ms",
         "patched p10-p90 ms", "speedup", "max |diff| first call", "replaced / left alone"])
    raw = {}
    watch = harness.Watch()
    watch.start()
    load_before = os.getloadavg()
    for lib, make in pairs.items():
        for mode in ("train", "sample"):
            try:
                slow, fast, report, model = make(mode, args.batch)
            except ImportError as e:
                table.notes.append(f"{lib}: not run ({e})")
                break
            diff = _agreement(slow, fast)
            res = harness.compare({"unpatched": slow, "patched": fast}, rounds=rounds,
                                  min_round_s=0.0, warmup=1)
            u, p = res["unpatched"], res["patched"]
            params = sum(t.numel() for t in model.parameters()) / 1e6
            name = "IF stage-I-style UNet2DConditionModel" if lib == "diffusers" else \
                "Unet(memory_efficient=True)"
            table.add(lib, name, params, mode, u.median_ms, p.median_ms,
                      f"{p.p10_ms:.0f}-{p.p90_ms:.0f}", u.median_ms / p.median_ms, diff,
                      f"{len(report.replaced)} / {len(report.left_alone)}")
            raw[f"{lib}/{mode}"] = dict(unpatched=u.as_dict(), patched=p.as_dict(),
                                       max_abs_diff=diff, report=report.summary())
            del slow, fast, model
    load_after = os.getloadavg()
    watch.stop()
    table.notes += [
        "unpatched: the library's own model; patched: imagen_fast.accelerate on a deep copy "
        "(same weights), both in this process, rounds interleaved in random order.",
        "train: forward + loss + backward + SGD step; sample: one guided denoising step "
        f"(guidance {GUIDANCE}) including the scheduler's dynamic thresholding.",
        "max |diff|: the first call of each from identical states (training: after one "
        "optimizer step, so float rounding of two different kernels shows).",
        f"load average before/after: {tuple(round(x, 2) for x in load_before)} / "
        f"{tuple(round(x, 2) for x in load_after)}; quiet machine (other work paused): "
        f"{args.quiet}. The ratio of interleaved medians is the number to read.",
    ]
    warning = harness.load_warning(load_before + load_after)
    if warning:
        table.notes.insert(0, warning)
    raw.update(load_before=load_before, load_after=load_after, if_unet=IF_UNET,
               if_scheduler=IF_SCHEDULER,
               imagen_pytorch_unet={k: list(v) if isinstance(v, tuple) else v for k, v in IP_SMALL.items()})
    machine = dict(harness.machine_info(), quiet=args.quiet, **watch.fields())
    path = harness.write_results(args.results_dir, args.out, machine, [table], raw)
    print(table.markdown())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
