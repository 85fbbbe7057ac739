"""`imagen-fast train`: one stage of the cascade, from one CPU to torchrun.

Determinism is what makes resume exact and ranks equivalent:
* the data stream (imagen_fast.data.StreamDataset, split over ranks and workers) has a
  position that is saved with every checkpoint and restored on resume, so the resumed
  run reads exactly the batches the uninterrupted run would have read;
* every random draw of a step (t, noise, text-dropout coins, augmentation levels and
  their noise) is made for the GLOBAL batch from a generator seeded by (seed, step),
  and each rank and accumulation micro-batch takes its slice.
So a run killed at any moment (SIGKILL included) and resumed from its last checkpoint
recomputes the same steps with the same data and noise, and N ranks whose local
batches make up a global batch follow a single process given that global batch (up to
floating-point reduction order).

A super-resolution stage can train on crops (``data.crop_size``, aligned crops of the
image and its low-res version, see ``imagen_fast.data.transforms``) and still sample at
``data.resolution`` (the preset's ``image_size``): the U-Nets are convolutional. Its
model config then records the crop as ``train_size``, and its sample grids are drawn at
the full resolution (see ``save_sample_grid``).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist

from . import checkpoint as ck
from .data import StreamDataset, StreamPosition, make_loader, open_dataset, transform_for_stage
from .diffusion import GaussianDiffusion
from .models import preset_config, unet_from_config
from .train_config import Config

log = logging.getLogger("imagen_fast.train")


# ------------------------------------------------------------------ distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain run is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device is cuda but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    return device


# ------------------------------------------------------------------- schedules
def lr_factor(step: int, cfg) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of the parameters (float32 shadow copies)."""

    def __init__(self, params: Dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: Dict[str, torch.Tensor], step: int) -> None:
        # The usual warmup, so early weights do not dominate a short run.
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in params.items():
            self.shadow[k].lerp_(v.detach().float(), 1 - d)

    def full_state(self) -> Dict[str, torch.Tensor]:
        """Whole tensors on the CPU (gathered from the ranks' shards under FSDP2);
        every rank must call it."""
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
                for k, v in self.shadow.items()}

    def load_full_state(self, state: Dict[str, torch.Tensor]) -> None:
        for k, v in self.shadow.items():
            full = state[k].float()
            if hasattr(v, "device_mesh"):             # a DTensor shard: take this rank's part
                from torch.distributed.tensor import distribute_tensor
                full = distribute_tensor(full.to(v.device), v.device_mesh, v.placements)
            v.copy_(full)


# ----------------------------------------------------------------------- data
def build_dataset(cfg: Config, d: Dist, *, whole: bool = False, shuffle: bool = True) -> StreamDataset:
    """The configured image-caption stream, split over this rank (``whole``: whole images
    even when training on crops, for the sample grids)."""
    dc = cfg.data
    transform = transform_for_stage(dc.resolution, dc.lowres_resolution or None,
                                    random_crop=dc.random_crop and not whole,
                                    crop_size=None if whole else dc.crop_size)
    kw = dict(seed=cfg.train.seed, rank=d.rank, world_size=d.world, shuffle=shuffle)
    if dc.kind == "shapes" and dc.path.startswith("shapes:"):
        return open_dataset(dc.path, transform, **kw)
    return StreamDataset(dc.path, transform, **kw)


def build_text_source(tc, model_config: Dict[str, Any]):
    """captions -> (embeddings, mask) from the embedding cache or the frozen encoder."""
    from .text import EmbeddingCache, get_text_encoder

    encoder = get_text_encoder(tc.encoder, max_length=tc.max_length)
    if tc.cache:
        encoder = EmbeddingCache(tc.cache, fallback=encoder)
    if encoder.dim != model_config["text_dim"]:
        raise ValueError(f"text encoder {tc.encoder!r} gives {encoder.dim}-d embeddings but the "
                         f"model expects text_dim={model_config['text_dim']} (set model.overrides.text_dim)")
    return encoder.encode


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed + 1) * 1_000_000_007 + step)


def stage_model_config(cfg: Config) -> Dict[str, Any]:
    """The U-Net config of the stage: the preset with its overrides, plus ``train_size``
    (the training crop's side) when the stage trains on crops."""
    config = preset_config(cfg.model.preset, **cfg.model.overrides)
    if cfg.data.crop_size:
        config["train_size"] = cfg.data.crop_size
    return config


def _halvings(model_config: Dict[str, Any]) -> int:
    """How many times the U-Net halves its input (sides must be multiples of 2**this)."""
    if model_config["arch"] == "efficient":
        return len(model_config["channels"])
    return len(model_config["channel_mult"]) - 1


def check_stage(cfg: Config, model_config: Dict[str, Any]) -> str:
    """The model's stage ("base" or "sr"), after checking the data settings fit it.

    ``data.resolution`` is the stage's sampling resolution and must be the preset's
    ``image_size`` (and ``data.lowres_resolution`` its ``lowres_size``); the training
    resolution is ``data.crop_size`` when set, independent of both."""
    dc = cfg.data
    stage = model_config["stage"]
    if stage == "sr" and not dc.lowres_resolution:
        raise ValueError("data.lowres_resolution must be set for a super-resolution preset")
    if stage == "base" and dc.lowres_resolution:
        raise ValueError("data.lowres_resolution must be 0 for a base preset")
    if model_config["image_size"] != dc.resolution:
        raise ValueError(f"data.resolution={dc.resolution} differs from the preset's "
                         f"image_size={model_config['image_size']} (data.resolution is the "
                         f"resolution the stage samples at; data.crop_size trains on crops)")
    lowres = model_config.get("lowres_size")
    if stage == "sr" and lowres and lowres != dc.lowres_resolution:
        raise ValueError(f"data.lowres_resolution={dc.lowres_resolution} differs from the "
                         f"preset's lowres_size={lowres}")
    if stage == "base" and cfg.diffusion.t_max < 1:
        raise ValueError(f"diffusion.t_max={cfg.diffusion.t_max}: a base stage samples from pure "
                         f"noise (t = 1) and must train up to it (t_max 1); t_max < 1 is for "
                         f"super-resolution stages sampled from a truncated start")
    if dc.crop_size:
        n = _halvings(model_config)
        if dc.crop_size % 2 ** n:
            raise ValueError(f"data.crop_size={dc.crop_size} must be a multiple of {2 ** n}: "
                             f"preset {model_config['name']!r} halves its input {n} times")
    return stage


def build_diffusion(cfg: Config, stage: str) -> GaussianDiffusion:
    dc = cfg.diffusion
    return GaussianDiffusion(schedule=dc.schedule, prediction=dc.prediction,
                             cond_drop_prob=dc.cond_drop_prob,
                             noise_aug=dc.noise_aug and stage == "sr",
                             aug_level_max=dc.aug_level_max)


def training_loss(diffusion: GaussianDiffusion, model, images, text, mask, lowres, t, noise, drop,
                  aug_level, aug_noise) -> torch.Tensor:
    """One micro-batch's loss with every random draw given as a tensor (t, noise, the
    text-dropout coins, augmentation levels and their noise): a function of tensors only,
    so a compiled one serves every step."""
    return diffusion.loss(model, images, text, mask, lowres, t=t, noise=noise, drop=drop,
                          aug_level=aug_level, aug_noise=aug_noise)


def compiled_loss(compile, fullgraph: bool = True):
    """``training_loss``, or with ``train.compile`` set, torch.compile of it: forward and
    loss as one graph (fullgraph; a single process: DDP splits its graph at gradient
    buckets on purpose), whose backward AOTAutograd derives and compiles with it. Its
    own code object (diffusion.step.own_code): no other compile's guards meet it, so the
    steps of a run compile once and never recompile."""
    from .diffusion.step import own_code, compile_options

    options = compile_options(compile, "train.compile")
    if options is None:
        return training_loss
    return torch.compile(own_code(training_loss), fullgraph=fullgraph, dynamic=False, **options)


# ------------------------------------------------------------------ the trainer
def init_weights(path: str, stage: str, model: torch.nn.Module) -> None:
    """Load trained weights into ``model`` (train.init_from / init_stage): from a training
    run or step directory (the EMA weights when it kept them), or from the stage ``stage``
    of a cascade directory. Refuses weights of another U-Net configuration."""
    from .cascade import CONFIG_NAME, WEIGHTS_NAME, ImagenCascade
    from safetensors.torch import load_file

    root = Path(path)
    if (root / CONFIG_NAME).is_file():
        config = ImagenCascade.read_config(str(root))
        names = [s["name"] for s in config["stages"]]
        if stage not in names:
            raise ValueError(f"train.init_stage={stage!r} is not a stage of {path} (stages: {names})")
        index = names.index(stage)
        saved = config["stages"][index]["unet"]
        prefix = f"stages.{index}."
        weights = {k[len(prefix):]: v for k, v in load_file(str(root / WEIGHTS_NAME)).items()
                   if k.startswith(prefix)}
    else:
        if stage:
            raise ValueError(f"train.init_stage is for a cascade directory; {path} has no {CONFIG_NAME}")
        step_dir = root if (root / "state.json").is_file() else ck.latest_checkpoint(
            root / "checkpoints" if (root / "checkpoints").is_dir() else root)
        if step_dir is None:
            raise ValueError(f"train.init_from={path!r}: no complete checkpoint and no cascade there")
        data = ck.load_checkpoint(step_dir)
        saved = data["state"]["model_config"]
        weights = dict(data["model"], **(data["ema"] or {}))
    if json.loads(json.dumps(saved)) != json.loads(json.dumps(model.config)):
        diff = sorted(k for k in set(saved) | set(model.config) if saved.get(k) != model.config.get(k))
        raise ck.CheckpointError(f"train.init_from={path!r} holds another U-Net (differs in {diff})")
    ck.check_state_dict_matches(model, weights, path)
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})
    log.info("initialized the weights from %s%s", path, f" (stage {stage})" if stage else "")


class TrainLoop:
    """The loop both trainers share (torch here, JAX in imagen_fast.jax.train):
    metrics, progress, checkpoints every ckpt_every steps and at the end, sample grids,
    SIGTERM/SIGINT = checkpoint and stop. Subclasses provide train_step(), save(),
    sample_weights() (torch-layout weights for the grid), save_grid(weights), and the
    attributes cfg, step, dataset, out_dir, is_main."""

    _stop = False

    def _install_signal_handlers(self):
        def handler(signum, frame):
            log.warning("signal %d: saving a checkpoint at the end of this step, then stopping", signum)
            self._stop = True
        with contextlib.suppress(ValueError):          # not the main thread
            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGINT, handler)

    def run(self, sample_fn=None) -> Dict[str, Any]:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(self.out_dir, self.step, enabled=self.is_main,
                             tensorboard=cfg.log.tensorboard)
        self._install_signal_handlers()
        bar = Progress(cfg.train.steps, self.step, enabled=self.is_main and cfg.log.progress)
        t_last, step_last = time.perf_counter(), self.step
        last = {}
        while self.step < cfg.train.steps and not self._stop:
            last = self.train_step()
            if self.step % cfg.log.log_every == 0 or self.step == cfg.train.steps:
                now = time.perf_counter()
                rate = (self.step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, self.step
                last.update(it_s=rate, images_s=rate * cfg.train.batch_size, skipped=self.skipped)
                metrics.write(self.step, last)
                bar.update(self.step, last)
            if self.step % cfg.log.ckpt_every == 0:
                self.save()
            if cfg.log.sample_every and self.step % cfg.log.sample_every == 0:
                # Gathering the weights may be collective (FSDP2, multi-host JAX): every rank takes part.
                weights = self.sample_weights()
                if self.is_main:
                    (sample_fn or type(self).save_grid)(self, weights)
        if self.step % cfg.log.ckpt_every != 0 or self._stop:
            self.save()
        bar.close()
        metrics.close()
        summary = {"step": self.step, "skipped_samples": self.skipped, **last}
        if self.is_main and self.skipped:
            log.warning("data: %s", self.dataset.skips.summary())
        return summary

    @property
    def skipped(self) -> int:
        return self.dataset.skips.skipped if self.dataset is not None else 0

    def grid_conditioning(self, prompts: List[str]) -> Tuple[torch.Tensor, List[str]]:
        """(low-res images (B, 3, s, s), prompts) an SR stage's sample grid upsamples.
        Trained on whole images: the last batch's low-res images with the log's prompts.
        Trained on crops: whole low-res images at data.lowres_resolution, so the grid is
        sampled at the full data.resolution as the stage is used, not at the crop size:
        the first len(prompts) records of the data in order (the same at every grid),
        each with its own caption."""
        if not self.cfg.data.crop_size:
            if self.last_lowres is None:
                raise RuntimeError("no low-res batch seen yet")
            lowres = torch.as_tensor(self.last_lowres[: len(prompts)])
            return lowres, prompts[: len(lowres)]
        cached = getattr(self, "_grid_examples", None)
        if cached is None or len(cached[1]) != len(prompts):
            ds = build_dataset(self.cfg, Dist(), whole=True, shuffle=False)
            samples = list(itertools.islice(iter(ds), len(prompts)))
            cached = (torch.stack([s["lowres"] for s in samples]), [s["caption"] for s in samples])
            self._grid_examples = cached
        return cached


class Trainer(TrainLoop):
    def __init__(self, cfg: Config, *, text_source=None, batches=None, resume: bool = False):
        """text_source(captions) -> (embeddings (B, L, D), mask (B, L)); default: the
        configured encoder or embedding cache. batches: an iterator of collated batch
        dicts ("image", "caption", "lowres" for SR) of this rank's micro-batch size, to
        replace the configured dataset (tests use it); resume needs the dataset."""
        self.cfg = cfg
        tc = cfg.train
        self.dist = init_distributed("cuda" if tc.device.startswith("cuda") or
                                     (tc.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.device = pick_device(tc.device, self.dist)
        if tc.batch_size % (tc.grad_accum * self.dist.world):
            raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by grad_accum x "
                             f"world size = {tc.grad_accum * self.dist.world}")
        self.micro_batch = tc.batch_size // (tc.grad_accum * self.dist.world)
        self.out_dir = Path(cfg.log.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"

        torch.manual_seed(tc.seed)
        self.model = unet_from_config(stage_model_config(cfg)).to(self.device)
        self.stage = check_stage(cfg, self.model.config)
        if tc.init_from:
            init_weights(tc.init_from, tc.init_stage, self.model)
        self.diffusion = build_diffusion(cfg, self.stage)
        self.train_model = self._wrap(self.model)
        self.loss_fn = compiled_loss(tc.compile, fullgraph=self.dist.world == 1)
        # After wrapping: under FSDP2 each rank keeps the EMA of its own shards.
        self.ema = EMA(dict(self.model.named_parameters()), tc.ema_decay) if tc.ema_decay > 0 else None
        self.optimizer = self._optimizer()
        self.step = 0
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.precision == "fp16")
        self.text_source = text_source or build_text_source(cfg.text, self.model.config)
        self.dataset = None if batches is not None else build_dataset(cfg, self.dist)
        self.position = StreamPosition(self.dataset)
        if resume:
            self._resume()
        self.batches = batches if batches is not None else iter(make_loader(
            self.dataset, self.micro_batch, num_workers=cfg.data.num_workers))
        self.last_lowres = None

    # ---------------------------------------------------------------- set-up
    def _wrap(self, model):
        if self.dist.world > 1:
            if self.cfg.distributed.strategy == "fsdp":
                from torch.distributed.fsdp import fully_shard

                # FSDP2 shards only contiguous parameters: channels_last weights go back to
                # NCHW (activations may stay channels_last).
                model.to(memory_format=torch.contiguous_format)
                for block in list(model.modules())[1:]:
                    if type(block).__name__ in ("UNetLayer", "DBlock", "UBlock"):
                        fully_shard(block)
                fully_shard(model)
            else:
                from torch.nn.parallel import DistributedDataParallel

                model = DistributedDataParallel(
                    model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def _optimizer(self):
        tc = self.cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        if tc.optimizer == "adafactor":
            return torch.optim.Adafactor(params, lr=tc.lr, weight_decay=tc.weight_decay)
        return torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps,
                                 weight_decay=tc.weight_decay)

    # ------------------------------------------------------------ checkpoints
    def _full_state(self):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=opts)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        return model_sd, optim_sd

    def save(self) -> None:
        model_sd, optim_sd = self._full_state()
        ema = self.ema.full_state() if self.ema else None
        if not self.dist.main:
            return
        state = {"data_position": self.position.state_dict(), "config": self.cfg.to_dict(),
                 "skips": self.dataset.skips.state_dict() if self.dataset else None,
                 "model_config": self.model.config, "diffusion": self.diffusion.config(),
                 "rng": ck.capture_rng_state(), "scaler": self.scaler.state_dict()}
        try:
            ck.save_checkpoint(self.ckpt_dir, self.step, model=model_sd, optimizer=optim_sd,
                               ema=ema, state=state, keep=self.cfg.log.keep)
        except OSError as e:
            # The previous checkpoint is intact; keep training and retry at the next save.
            log.error("saving checkpoint at step %d failed (%s); previous checkpoint kept", self.step, e)

    def _resume(self) -> None:
        path = ck.latest_checkpoint(self.ckpt_dir)
        if path is None:
            log.warning("--resume: no checkpoint under %s, starting from step 0", self.ckpt_dir)
            return
        data = ck.load_checkpoint(path)
        state = data["state"]
        if state.get("model_config") != self.model.config:
            raise ck.CheckpointError(f"{path} was written for another model: checkpoint "
                                     f"{state.get('model_config')} vs config {self.model.config}")
        ck.check_state_dict_matches(self.model, data["model"], str(path))
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, data["model"], options=opts)
        set_optimizer_state_dict(self.model, self.optimizer, data["optimizer"], options=opts)
        if self.ema and data["ema"] is not None:
            self.ema.load_full_state(data["ema"])
        self.step = state["step"]
        if self.dataset is None:
            raise ValueError("resume needs the configured dataset (not an injected batch iterator)")
        self.dataset.set_position(state["data_position"])
        self.position.load_state_dict(state["data_position"])
        if state.get("skips"):
            self.dataset.skips.load_state_dict(state["skips"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ck.restore_rng_state(state["rng"])
        log.info("resumed from %s (step %d)", path, self.step)

    # ------------------------------------------------------------------ steps
    def _draws(self, lowres: bool) -> Dict[str, Any]:
        """Every random number of this step, for the global batch."""
        tc = self.cfg.train
        res, lr = self.cfg.data.train_sizes()           # the crop's sizes when training on crops
        g = step_generator(tc.seed, self.step)
        b = tc.batch_size
        d = {"t": torch.rand(b, generator=g, dtype=torch.float64) * self.cfg.diffusion.t_max,
             "noise": torch.randn(b, 3, res, res, generator=g),
             "drop": torch.rand(b, generator=g, dtype=torch.float64)}
        if lowres:
            d["aug_level"] = (torch.rand(b, generator=g, dtype=torch.float64)
                              * self.diffusion.aug_level_max if self.diffusion.noise_aug
                              else torch.zeros(b, dtype=torch.float64))
            d["aug_noise"] = torch.randn(b, 3, lr, lr, generator=g)
        return d

    def train_step(self) -> Dict[str, float]:
        tc = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = tc.lr * lr_factor(self.step, tc)
        draws = self._draws(self.stage == "sr")
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16 if tc.precision == "bf16"
                                   else torch.float16) if tc.precision != "fp32"
                    else contextlib.nullcontext())
        total_loss = 0.0
        for k in range(tc.grad_accum):
            batch = next(self.batches)
            if self.dataset is not None:
                self.position.update(batch)
            images = batch["image"].to(self.device)
            if images.shape[0] != self.micro_batch:
                raise RuntimeError(f"data gave a batch of {images.shape[0]}, expected {self.micro_batch}")
            emb, mask = self.text_source(batch["caption"])
            emb, mask = emb.to(self.device), mask.to(self.device)
            lo = k * (tc.batch_size // tc.grad_accum) + self.dist.rank * self.micro_batch
            sub = {name: v[lo:lo + self.micro_batch].to(self.device) for name, v in draws.items()}
            lowres = batch["lowres"].to(self.device) if self.stage == "sr" else None
            self.last_lowres = lowres
            if tc.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            sync = contextlib.nullcontext()
            if k < tc.grad_accum - 1 and hasattr(self.train_model, "no_sync"):
                sync = self.train_model.no_sync()
            with sync:
                with autocast:
                    loss = self.loss_fn(self.diffusion, self.train_model, images, emb, mask, lowres,
                                        sub["t"], sub["noise"].to(images.dtype),
                                        sub["drop"] < self.diffusion.cond_drop_prob,
                                        sub.get("aug_level"), sub.get("aug_noise"))
                self.scaler.scale(loss / tc.grad_accum).backward()
            total_loss += loss.item()
        self.scaler.unscale_(self.optimizer)
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
                     if tc.grad_clip > 0 else torch.tensor(0.0))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(dict(self.model.named_parameters()), self.step)
        self.step += 1
        loss_value = total_loss / tc.grad_accum
        if self.dist.world > 1:
            t = torch.tensor([loss_value], device=self.device)
            dist.all_reduce(t)
            loss_value = t.item() / self.dist.world
        return {"loss": loss_value, "grad_norm": float(grad_norm), "lr": self.optimizer.param_groups[0]["lr"]}

    # ------------------------------------------------------------ loop hooks
    @property
    def is_main(self) -> bool:
        return self.dist.main

    def sample_weights(self) -> Dict[str, torch.Tensor]:
        return self.ema.full_state() if self.ema else self._full_state()[0]

    def save_grid(self, weights) -> Path:
        return save_sample_grid(self, weights)


def image_grid(images: torch.Tensor, columns: int = 4):
    """(B, 3, H, W) in [-1, 1] -> one PIL image, ``columns`` wide."""
    from .data.transforms import image_grid as pil_grid, to_pil

    return pil_grid([to_pil(img.float().cpu()) for img in images], columns)


@torch.no_grad()
def save_sample_grid(trainer: "Trainer", weights: Dict[str, torch.Tensor]) -> Path:
    """Sample the log's prompts with the EMA weights (or the live ones) into
    <out_dir>/samples/step_XXXXXXXX.png, at data.resolution. SR stages upsample the
    low-res images of ``grid_conditioning`` (whole ones when training on crops). With
    ``train.compile`` the sampling step is compiled too, once for the whole run (the
    weights are loaded into one grid model)."""
    from .diffusion import sample
    from .models import unet_from_config

    lc = trainer.cfg.log
    model = getattr(trainer, "grid_model", None)
    if model is None:                 # one model for every grid: a compiled step is kept for it
        model = trainer.grid_model = unet_from_config(trainer.model.config, device=trainer.device)
    model.load_state_dict(weights)
    model.eval()
    prompts = list(lc.sample_prompts)
    res = trainer.cfg.data.resolution
    lowres = None
    if trainer.stage == "sr":
        lowres, prompts = trainer.grid_conditioning(prompts)
        lowres = lowres.to(trainer.device)
    emb, mask = trainer.text_source(prompts)
    g = torch.Generator(device=trainer.device).manual_seed(trainer.cfg.train.seed)
    images = sample(model, trainer.diffusion, (len(prompts), 3, res, res), text_embeds=emb.to(trainer.device),
                    text_mask=mask.to(trainer.device), lowres=lowres, guidance=lc.sample_guidance,
                    sampler="ddim", steps=lc.sample_steps, generator=g, device=trainer.device,
                    compile=trainer.cfg.train.compile, start=trainer.cfg.diffusion.t_max)
    out = trainer.out_dir / "samples" / f"step_{trainer.step:08d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, columns=min(4, len(prompts))).save(out)
    return out


class MetricsLog:
    """JSONL metrics (and TensorBoard when installed). On resume, lines past the
    resumed step are dropped so the log has each step once."""

    def __init__(self, out_dir: Path, start_step: int, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
            ck.write_text_atomic(self.path, "".join(ln + "\n" for ln in kept))
        self.f = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, step: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.f.flush()
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb:
                self.tb.close()


class Progress:
    """A progress bar with loss, it/s and ETA (tqdm when installed, else log lines)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled, self.total, self.bar = enabled, total, None
        self.t0, self.start = time.perf_counter(), start
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values.get('images_s', 0):.1f}")
            self.bar.refresh()
        else:
            rate = (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - step) / max(rate, 1e-9)
            print(f"step {step}/{self.total} loss {values['loss']:.4f} {rate:.2f} it/s "
                  f"ETA {eta / 60:.1f} min", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
