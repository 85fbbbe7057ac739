"""The training configuration: a TOML file of sections, every key checked at start.

    [model]      preset = "tiny-base32"; overrides = { ... } (any preset field)
    [diffusion]  schedule, prediction, cond_drop_prob, noise_aug, aug_level_max, t_max
    [data]       kind = "shapes" | "folder" | "shards"; path; resolution; lowres_resolution;
                 crop_size (SR stages trained on aligned crops); ...
    [text]       encoder = "minilm" | "t5:<dir>"; cache = "<dir>" (optional); max_length
    [train]      steps, batch_size, grad_accum, lr, warmup_steps, optimizer, ema_decay,
                 precision, grad_clip, channels_last, compile, seed, device,
                 init_from + init_stage (fine-tune from a run or a cascade's stage), ...
    [log]        out_dir, log_every, ckpt_every, keep, sample_every, sample_prompts, ...
    [distributed] strategy = "ddp" | "fsdp"; mesh, multi_host, coordinator, ... (JAX)

An unknown section or key, a value of the wrong type or out of range fails before
anything runs, with a message naming the key (e.g. ``train.lr must be > 0``).
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration key that is unknown, mistyped or out of range."""


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key} {msg}")


@dataclass
class ModelConfig:
    preset: str = "tiny-base32"
    overrides: Dict[str, Any] = field(default_factory=dict)

    def validate(self, s: str) -> None:
        from .models import PRESETS
        _need(self.preset in PRESETS, f"{s}.preset", f"must be one of {sorted(PRESETS)}, got {self.preset!r}")


@dataclass
class DiffusionConfig:
    schedule: str = "cosine"
    prediction: str = "eps"
    cond_drop_prob: float = 0.1
    noise_aug: bool = True          # used by SR stages only
    aug_level_max: float = 0.5
    # Training draws t ~ U(0, t_max). Below 1 for a super-resolution stage sampled from a
    # truncated start (sampling "start" <= t_max: its upsampled input diffused to that
    # time), which never meets the times above it.
    t_max: float = 1.0

    def validate(self, s: str) -> None:
        _need(self.schedule in ("cosine", "linear"), f"{s}.schedule",
              f"must be 'cosine' or 'linear', got {self.schedule!r}")
        _need(self.prediction in ("eps", "v"), f"{s}.prediction", f"must be 'eps' or 'v', got {self.prediction!r}")
        _need(0 <= self.cond_drop_prob <= 1, f"{s}.cond_drop_prob", "must be in [0, 1]")
        _need(0 <= self.aug_level_max <= 1, f"{s}.aug_level_max", "must be in [0, 1]")
        _need(0 < self.t_max <= 1, f"{s}.t_max", f"must be in (0, 1], got {self.t_max}")


@dataclass
class DataConfig:
    kind: str = "shapes"            # shapes | folder | shards
    path: str = ""
    resolution: int = 32            # the stage's output (sampling) resolution: the preset's image_size
    lowres_resolution: int = 0      # SR stages: conditioning resolution (0 = base stage)
    random_crop: bool = False       # SR stages: random crops of larger images
    # SR stages: train on random crop_size x crop_size crops of the resolution-sized image
    # (0 = the whole image); the low-res conditioning is made from the whole image and cut
    # at the same place (offsets on the factor's grid). The stage still samples at resolution.
    crop_size: int = 0
    num_workers: int = 0

    def validate(self, s: str) -> None:
        _need(self.kind in ("shapes", "folder", "shards"), f"{s}.kind",
              f"must be 'shapes', 'folder' or 'shards', got {self.kind!r}")
        _need(bool(self.path), f"{s}.path", "must name the dataset directory")
        _need(self.resolution >= 8, f"{s}.resolution", f"must be >= 8, got {self.resolution}")
        _need(0 <= self.lowres_resolution < self.resolution, f"{s}.lowres_resolution",
              "must be 0 (base stage) or smaller than resolution")
        if self.crop_size:
            from .data.transforms import crop_grid_error
            problem = crop_grid_error(self.resolution, self.lowres_resolution, self.crop_size)
            _need(problem is None, f"{s}.crop_size",
                  f"{problem} ({s}.resolution={self.resolution}, "
                  f"{s}.lowres_resolution={self.lowres_resolution})")
        _need(self.num_workers >= 0, f"{s}.num_workers", "must be >= 0")

    def train_sizes(self) -> tuple:
        """(image side, low-res side or 0) of a training example: the crop's when
        training on crops, else the whole image's."""
        if not self.crop_size:
            return self.resolution, self.lowres_resolution
        return self.crop_size, self.crop_size * self.lowres_resolution // self.resolution


@dataclass
class TextConfig:
    encoder: str = "minilm"
    cache: str = ""                 # embedding cache directory ("" = encode on the fly)
    max_length: int = 32

    def validate(self, s: str) -> None:
        _need(self.max_length >= 1, f"{s}.max_length", "must be >= 1")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32            # global batch (all ranks, all accumulation steps)
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "cosine"     # cosine | constant (after warmup)
    min_lr_ratio: float = 0.0
    optimizer: str = "adamw"        # adamw | adafactor
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    ema_decay: float = 0.999        # 0 disables EMA
    precision: str = "fp32"         # fp32 | bf16 | fp16
    grad_clip: float = 1.0          # 0 disables clipping
    channels_last: bool = True
    # torch.compile of the training step (forward + loss, and the backward AOTAutograd
    # derives from it) as one graph: false | true (= "default") | "default" |
    # "reduce-overhead" | "max-autotune" | a table of torch.compile's mode/backend/options
    compile: Any = False
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    # Fine-tuning: start from trained weights instead of a random initialization. A run
    # directory or one of its step directories (its EMA weights when kept), or a cascade
    # directory (`imagen-fast export`) with init_stage naming the stage. The optimizer,
    # step and data position start fresh; --resume of this run takes precedence.
    init_from: str = ""
    init_stage: str = ""

    def validate(self, s: str) -> None:
        _need(not self.init_stage or self.init_from, f"{s}.init_stage",
              "needs train.init_from (the cascade directory it names a stage of)")
        _need(self.steps >= 1, f"{s}.steps", f"must be >= 1, got {self.steps}")
        _need(self.batch_size >= 1, f"{s}.batch_size", f"must be >= 1, got {self.batch_size}")
        _need(self.grad_accum >= 1, f"{s}.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _need(self.batch_size % self.grad_accum == 0, f"{s}.batch_size",
              f"must be divisible by grad_accum={self.grad_accum}")
        _need(self.lr > 0, f"{s}.lr", f"must be > 0, got {self.lr}")
        _need(self.warmup_steps >= 0, f"{s}.warmup_steps", "must be >= 0")
        _need(self.lr_schedule in ("cosine", "constant"), f"{s}.lr_schedule", "must be 'cosine' or 'constant'")
        _need(0 <= self.min_lr_ratio <= 1, f"{s}.min_lr_ratio", "must be in [0, 1]")
        _need(self.optimizer in ("adamw", "adafactor"), f"{s}.optimizer",
              f"must be 'adamw' or 'adafactor', got {self.optimizer!r}")
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{s}.betas",
              "must be two numbers in [0, 1)")
        _need(0 <= self.ema_decay < 1, f"{s}.ema_decay", "must be in [0, 1)")
        _need(self.precision in ("fp32", "bf16", "fp16"), f"{s}.precision",
              f"must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        _need(self.grad_clip >= 0, f"{s}.grad_clip", "must be >= 0")
        from .diffusion.step import compile_options
        try:
            compile_options(self.compile, f"{s}.compile")
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class LogConfig:
    out_dir: str = "runs/default"
    log_every: int = 10
    ckpt_every: int = 200
    keep: int = 3
    sample_every: int = 0           # 0 = no sample grids during training
    sample_steps: int = 20
    sample_guidance: float = 3.0
    sample_prompts: List[str] = field(default_factory=lambda: ["two red circles above a blue square"])
    tensorboard: bool = True
    progress: bool = True

    def validate(self, s: str) -> None:
        for k in ("log_every", "ckpt_every"):
            _need(getattr(self, k) >= 1, f"{s}.{k}", "must be >= 1")
        _need(self.keep >= 1, f"{s}.keep", "must be >= 1")
        _need(self.sample_every >= 0, f"{s}.sample_every", "must be >= 0")


@dataclass
class DistributedConfig:
    strategy: str = "ddp"           # ddp | fsdp (torch: FSDP2 fully_shard; JAX: the mesh's fsdp axis)
    # JAX backend only (see imagen_fast/jax/sharding.py):
    mesh: List[int] = field(default_factory=list)   # [data, fsdp]; [] = from strategy
    multi_host: bool = False        # start jax.distributed (auto-detected on Cloud TPU)
    coordinator: str = ""           # host:port of process 0 when not auto-detected
    num_processes: int = 0
    process_id: int = -1

    def validate(self, s: str) -> None:
        _need(self.strategy in ("ddp", "fsdp"), f"{s}.strategy", f"must be 'ddp' or 'fsdp', got {self.strategy!r}")
        _need(not self.mesh or (len(self.mesh) == 2 and min(self.mesh) >= 1), f"{s}.mesh",
              f"must be [data, fsdp] with positive sizes, got {self.mesh}")
        _need(not self.coordinator or (self.num_processes >= 1 and self.process_id >= 0),
              f"{s}.coordinator", "needs distributed.num_processes and distributed.process_id")


SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig,
            "text": TextConfig, "train": TrainConfig, "log": LogConfig,
            "distributed": DistributedConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        _need(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if typ is int:
        _need(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if typ is float:
        _need(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if typ is str:
        _need(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    if origin in (list, List):
        (inner,) = typing.get_args(typ)
        _need(isinstance(value, list), key, f"must be a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        _need(isinstance(value, dict), key, f"must be a table, got {value!r}")
        return dict(value)
    return value


def config_from_dict(raw: Dict[str, Any]) -> Config:
    cfg = Config()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}]; known: {sorted(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown key {section}.{key}; known: {sorted(known)}")
            kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **kwargs))
    for section in SECTIONS:
        getattr(cfg, section).validate(section)
    return cfg


def load_config(path, overrides: Optional[List[str]] = None) -> Config:
    """Read a TOML config; ``overrides`` are "section.key=value" strings (TOML values)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not valid TOML: {e}") from None
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value                      # a bare string
        raw.setdefault(section, {})[key] = parsed
    return config_from_dict(raw)
