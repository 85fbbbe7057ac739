"""`imagen-fast train --backend jax`: one cascade stage, trained with a train step
jitted over a device mesh (data parallel x parameter sharded, see ``sharding``).

The same TOML config, data stream, text cache, checkpoints and loop as the torch
trainer (``imagen_fast.train``), with these differences:

* every random draw of a step (t, noise, text-dropout coins, augmentation levels
  and their noise) comes from ``fold_in(key(seed), step)`` on the device, for the
  global batch, so it does not depend on the mesh: a sharded step computes the
  single-device step's loss (up to reduction order), and a resumed run repeats the
  uninterrupted one;
* text embeddings are padded (or cut) to ``text.max_length`` tokens, so every step
  has the same shapes and compiles once;
* checkpoints hold the weights, EMA and AdamW state in torch's names and layouts
  (``step_XXXXXXXX/model.safetensors`` etc., ``"backend": "jax"`` in state.json): a
  JAX run resumes a torch run's checkpoint and the other way round, and the weights
  load into the torch models as they are;
* precision "bf16" computes in bfloat16 with float32 master weights; "fp16" (which
  needs loss scaling) and the Adafactor optimizer are torch-only for now;
* multi-host: ``distributed.multi_host = true`` starts ``jax.distributed`` (each host
  reads its share of the global batch: the data stream is split by process).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from .. import checkpoint as ck
from ..data import StreamPosition, make_loader
from ..train import (
    TrainLoop,
    build_dataset,
    build_diffusion,
    build_text_source,
    check_stage,
    image_grid,
    lr_factor,
    stage_model_config,
)
from ..train_config import Config, ConfigError
from . import convert, sharding
from .diffusion import Diffusion, compile_sampler
from .models import unet_from_config
from .optim import adamw_init, adamw_update, clip_by_global_norm, ema_update

log = logging.getLogger("imagen_fast.train")
_STEP_CACHE: Dict[Any, Any] = {}          # compiled steps, shared by trainers of one process


def check_config(cfg: Config) -> None:
    tc = cfg.train
    if tc.precision == "fp16":
        raise ConfigError("train.precision = 'fp16' is not supported with --backend jax "
                          "(it needs loss scaling): use 'bf16'")
    if tc.optimizer != "adamw":
        raise ConfigError(f"train.optimizer = {tc.optimizer!r} is not supported with "
                          f"--backend jax yet: use 'adamw'")
    if tc.init_from:
        raise ConfigError("train.init_from is not supported with --backend jax yet: "
                          "fine-tune with the torch backend")


def _host(tree):
    """Device arrays (sharded across hosts or not) as numpy, on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.float().movedim(1, -1).contiguous().numpy()


def make_train_step(graphdef, diffusion: Diffusion, cfg: Config):
    """step(state, batch, lr) -> (state, metrics), a pure function of its inputs.

    state: {"params", "opt": {"exp_avg", "exp_avg_sq"}, "ema" (or absent), "step"};
    batch: {"image" (B,H,W,3), "text" (B,L,D), "mask" (B,L), "lowres" (SR)}."""
    tc = cfg.train
    accum = tc.grad_accum

    def loss_fn(params, batch, draws):
        model = nnx.merge(graphdef, params)
        return diffusion.loss(model, batch["image"], batch["text"], batch["mask"],
                              batch.get("lowres"), draws)

    def micro(tree, k):
        """Micro-batch k: every accum-th example from k, so that it stays spread over
        all the devices the batch is split across."""
        return jax.tree_util.tree_map(
            lambda a: None if a is None else a.reshape(-1, accum, *a.shape[1:])[:, k], tree)

    def step(state, batch, lr):
        key = jax.random.fold_in(jax.random.key(tc.seed), state["step"])
        lowres = batch.get("lowres")
        draws = diffusion.draws(key, batch["image"].shape, None if lowres is None else lowres.shape,
                                cfg.diffusion.t_max)
        grad_fn = jax.value_and_grad(loss_fn)
        if accum == 1:
            loss, grads = grad_fn(state["params"], batch, draws)
        else:                        # micro-batches of the global batch, grads averaged
            def body(carry, k):
                loss_k, grads_k = grad_fn(state["params"], micro(batch, k), micro(draws, k))
                return jax.tree_util.tree_map(jnp.add, carry, (loss_k, grads_k)), None
            zero = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, state["params"]))
            (loss, grads), _ = jax.lax.scan(body, zero, jnp.arange(accum))
            loss, grads = jax.tree_util.tree_map(lambda a: a / accum, (loss, grads))
        grads, grad_norm = clip_by_global_norm(grads, tc.grad_clip)
        params, opt = adamw_update(state["params"], grads, state["opt"], state["step"] + 1, lr,
                                   betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay)
        new = dict(state, params=params, opt=opt, step=state["step"] + 1)
        if "ema" in state:
            new["ema"] = ema_update(state["ema"], params, state["step"], tc.ema_decay)
        return new, {"loss": loss, "grad_norm": grad_norm}

    return step


class JaxTrainer(TrainLoop):
    def __init__(self, cfg: Config, *, text_source=None, batches=None, resume: bool = False,
                 devices=None):
        """As ``imagen_fast.train.Trainer``; ``batches`` yields this process's share of
        each global batch; ``devices`` (default: all) form the mesh."""
        check_config(cfg)
        self.cfg = cfg
        tc, dc = cfg.train, cfg.distributed
        if dc.multi_host:
            sharding.initialize_distributed(dc.coordinator, dc.num_processes, dc.process_id)
        devices = jax.devices() if devices is None else list(devices)
        data, fsdp = sharding.mesh_shape(dc.strategy, dc.mesh, len(devices))
        self.mesh = sharding.make_mesh(data, fsdp, devices)
        if tc.batch_size % (data * fsdp):
            raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the "
                             f"{data * fsdp} devices of the mesh")
        if tc.batch_size % tc.grad_accum or (tc.batch_size // tc.grad_accum) % (data * fsdp):
            raise ValueError(f"train.batch_size / grad_accum = {tc.batch_size / tc.grad_accum:g} "
                             f"must be divisible by the {data * fsdp} devices")
        self.local_batch, err = sharding.local_batch(tc.batch_size)
        if err:
            raise ValueError(err)
        self.is_main = jax.process_index() == 0
        self.out_dir = Path(cfg.log.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        model_config = stage_model_config(cfg)
        self.stage = check_stage(cfg, model_config)
        self.torch_diffusion = build_diffusion(cfg, self.stage)
        self.diffusion = Diffusion(self.torch_diffusion.config())
        dtype = jnp.bfloat16 if tc.precision == "bf16" else jnp.float32
        self.model = unet_from_config(model_config, seed=tc.seed, dtype=dtype)
        self.graphdef, params = nnx.split(self.model)
        state = {"params": params, "opt": adamw_init(params), "step": jnp.zeros((), jnp.int32)}
        if tc.ema_decay > 0:
            state["ema"] = jax.tree_util.tree_map(jnp.array, params)
        self.step = 0
        self.text_source = text_source or build_text_source(cfg.text, model_config)
        self.dataset = None if batches is not None else build_dataset(
            cfg, _ProcessSplit(jax.process_index(), jax.process_count()))
        self.position = StreamPosition(self.dataset)
        if resume:
            state = self._resume(state)
        self.state_shardings = sharding.tree_shardings(state, self.mesh)
        self.state = jax.device_put(state, self.state_shardings)
        self.batches = batches if batches is not None else iter(make_loader(
            self.dataset, self.local_batch, num_workers=cfg.data.num_workers))
        self._step_fn = None
        self.last_lowres = None

    # ------------------------------------------------------------------ steps
    def _compiled_step(self, batch):
        if self._step_fn is None:
            tc = self.cfg.train
            key = (json.dumps(self.model.config, sort_keys=True), json.dumps(self.diffusion.config),
                   tc.seed, tc.grad_accum, tc.grad_clip, tuple(tc.betas), tc.eps, tc.weight_decay,
                   tc.ema_decay, tc.precision, self.mesh.shape_tuple,
                   tuple(d.id for d in self.mesh.devices.flat),
                   tuple((k, v.shape) for k, v in sorted(batch.items())))
            if key not in _STEP_CACHE:
                batch_sh = {k: sharding.batch_sharding(self.mesh, v.ndim) for k, v in batch.items()}
                repl = sharding.replicated(self.mesh)
                _STEP_CACHE[key] = jax.jit(
                    make_train_step(self.graphdef, self.diffusion, self.cfg),
                    in_shardings=(self.state_shardings, batch_sh, repl),
                    out_shardings=(self.state_shardings, repl), donate_argnums=0)
            self._step_fn = _STEP_CACHE[key]
        return self._step_fn

    def _global_batch(self, local: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(
            sharding.batch_sharding(self.mesh, v.ndim), v) for k, v in local.items()}

    def next_batch(self) -> Dict[str, np.ndarray]:
        """This process's part of the next global batch, as numpy NHWC arrays."""
        raw = next(self.batches)
        if self.dataset is not None:
            self.position.update(raw)
        images = raw["image"]
        if images.shape[0] != self.local_batch:
            raise RuntimeError(f"data gave a batch of {images.shape[0]}, expected {self.local_batch}")
        emb, mask = self.text_source(raw["caption"])
        text, text_mask = convert.pad_text(emb, mask, self.cfg.text.max_length)
        batch = {"image": _nhwc(images), "text": text, "mask": text_mask}
        if self.stage == "sr":
            batch["lowres"] = _nhwc(raw["lowres"])
            self.last_lowres = raw["lowres"]           # (B, 3, s, s) torch, for the grids
        return batch

    def train_step(self) -> Dict[str, float]:
        tc = self.cfg.train
        lr = tc.lr * lr_factor(self.step, tc)
        batch = self._global_batch(self.next_batch())
        self.state, metrics = self._compiled_step(batch)(self.state, batch,
                                                         jnp.asarray(lr, jnp.float32))
        self.step += 1
        return {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]), "lr": lr}

    # ------------------------------------------------------------- checkpoints
    def _torch_layout(self, tree) -> Dict[str, torch.Tensor]:
        model = nnx.merge(self.graphdef, tree)
        return {k: torch.from_numpy(np.array(v)) for k, v in convert.state_dict(model).items()}

    def _optimizer_state(self, host) -> Dict[str, Any]:
        """AdamW state as torch's (FSDP full) optimizer state_dict, keyed by parameter name."""
        from ..models import unet_from_config as torch_unet

        tc = self.cfg.train
        names = [n for n, _ in torch_unet(self.model.config, device="meta").named_parameters()]
        group = torch.optim.AdamW([torch.zeros(1)], lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps,
                                  weight_decay=tc.weight_decay).state_dict()["param_groups"][0]
        group = dict(group, params=names, lr=tc.lr * lr_factor(max(self.step - 1, 0), tc))
        m, v = (self._torch_layout(host["opt"][k]) for k in ("exp_avg", "exp_avg_sq"))
        step = torch.tensor(float(self.step))
        state = {n: {"step": step.clone(), "exp_avg": m[n], "exp_avg_sq": v[n]} for n in names}
        return {"state": state, "param_groups": [group]}

    def save(self) -> None:
        host = _host(self.state)
        if not self.is_main:
            return
        state = {"data_position": self.position.state_dict(), "config": self.cfg.to_dict(),
                 "skips": self.dataset.skips.state_dict() if self.dataset else None,
                 "model_config": self.model.config, "diffusion": self.diffusion.config,
                 "rng": ck.capture_rng_state(), "backend": "jax"}
        try:
            ck.save_checkpoint(self.ckpt_dir, self.step, model=self._torch_layout(host["params"]),
                               optimizer=self._optimizer_state(host),
                               ema=self._torch_layout(host["ema"]) if "ema" in host else None,
                               state=state, keep=self.cfg.log.keep)
        except OSError as e:
            log.error("saving checkpoint at step %d failed (%s); previous checkpoint kept", self.step, e)

    def _load_tree(self, sd, what: str):
        model = unet_from_config(self.model.config)
        try:
            convert.load_state_dict(model, sd, what=what)
        except ValueError as e:
            raise ck.CheckpointError(str(e)) from None
        return nnx.split(model)[1]

    def _resume(self, state):
        path = ck.latest_checkpoint(self.ckpt_dir)
        if path is None:
            log.warning("--resume: no checkpoint under %s, starting from step 0", self.ckpt_dir)
            return state
        data = ck.load_checkpoint(path)
        saved = data["state"]
        if saved.get("model_config") != self.model.config:
            raise ck.CheckpointError(f"{path} was written for another model: checkpoint "
                                     f"{saved.get('model_config')} vs config {self.model.config}")
        state = dict(state, params=self._load_tree(data["model"], f"{path} weights"))
        opt = data["optimizer"]["state"] if data["optimizer"] else {}
        if any("exp_avg" not in v for v in opt.values()) or not opt:
            raise ck.CheckpointError(f"{path} holds no AdamW state (optimizer "
                                     f"{saved['config']['train']['optimizer']!r})")
        state["opt"] = {k: self._load_tree({n: v[k] for n, v in opt.items()}, f"{path} {k}")
                        for k in ("exp_avg", "exp_avg_sq")}
        if "ema" in state and data["ema"] is not None:
            state["ema"] = self._load_tree(data["ema"], f"{path} EMA")
        self.step = saved["step"]
        state["step"] = jnp.asarray(self.step, jnp.int32)
        if self.dataset is None:
            raise ValueError("resume needs the configured dataset (not an injected batch iterator)")
        self.dataset.set_position(saved["data_position"])
        self.position.load_state_dict(saved["data_position"])
        if saved.get("skips"):
            self.dataset.skips.load_state_dict(saved["skips"])
        ck.restore_rng_state(saved["rng"])
        log.info("resumed from %s (step %d)", path, self.step)
        return state

    # ------------------------------------------------------------ loop hooks
    def run(self, sample_fn=None) -> Dict[str, Any]:
        summary = super().run(sample_fn)
        summary["mesh"] = dict(self.mesh.shape)
        return summary

    def sample_weights(self):
        host = _host(self.state)
        return host.get("ema", host["params"])

    def save_grid(self, weights) -> Path:
        """Sample the log's prompts with ``weights`` (EMA or live) into
        <out_dir>/samples/step_XXXXXXXX.png, with the JAX sampler."""
        lc = self.cfg.log
        model = nnx.merge(self.graphdef, weights)
        prompts = list(lc.sample_prompts)
        res = self.cfg.data.resolution
        lowres = None
        if self.stage == "sr":
            low, prompts = self.grid_conditioning(prompts)
            lowres = jnp.asarray(_nhwc(low))
        emb, mask = self.text_source(prompts)
        text, text_mask = convert.pad_text(emb, mask, self.cfg.text.max_length)
        run = compile_sampler(model, self.diffusion, shape=(len(text), res, res, 3),
                              guidance=lc.sample_guidance, sampler="ddim",
                              steps=lc.sample_steps, start=self.cfg.diffusion.t_max)
        images = run(jax.random.key(self.cfg.train.seed), jnp.asarray(text),
                     jnp.asarray(text_mask), lowres)
        images = torch.from_numpy(np.array(images)).movedim(-1, 1).clamp(-1, 1)
        out = self.out_dir / "samples" / f"step_{self.step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, columns=min(4, len(text))).save(out)
        return out


class _ProcessSplit:
    """The rank/world view ``build_dataset`` takes, for JAX processes."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
