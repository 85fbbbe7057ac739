"""Assemble a cascade from the training runs of its stages (`imagen-fast export`).

Each stage is trained by its own `imagen-fast train` run; ``cascade_from_runs`` takes the
newest checkpoint of each run (EMA weights by default), its U-Net and diffusion config,
and the text encoder the run was configured with, and builds an ``ImagenCascade`` whose
stages are in the order given (base first). ``imagen-fast export`` writes it as a
cascade directory (config.json + model.safetensors, fp16 by default) that
``imagen-fast sample --checkpoint`` and ``load_pipeline`` read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

# torch and the models are imported when a function runs, so `imagen-fast` starts fast.


def stage_from_run(run_dir, *, name: Optional[str] = None, ema: bool = True,
                   step: Optional[int] = None) -> tuple:
    """(Stage, text config, checkpoint step) from a training run directory (its
    ``checkpoints/`` folder or the folder itself)."""
    from . import checkpoint as ck
    from .diffusion import GaussianDiffusion
    from .models import unet_from_config
    from .cascade import SamplingConfig, Stage
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    if step is None:
        path = ck.latest_checkpoint(ckpt_dir)
    else:
        path = ckpt_dir / f"{ck.STEP_PREFIX}{step:08d}"
        path = path if path in ck.list_checkpoints(ckpt_dir) else None
    if path is None:
        raise ValueError(f"{run_dir}: no complete checkpoint{'' if step is None else f' at step {step}'}")
    data = ck.load_checkpoint(path)
    state = data["state"]
    unet = unet_from_config(state["model_config"])
    weights = dict(data["model"])
    if ema:
        if data["ema"] is None:
            raise ValueError(f"{path}: the run kept no EMA weights (pass ema=False / --no-ema)")
        weights.update(data["ema"])
    ck.check_state_dict_matches(unet, weights, str(path))
    unet.load_state_dict(weights)
    text_cfg = state["config"]["text"]
    stage = Stage(name or unet.config["name"], unet, GaussianDiffusion.from_config(state["diffusion"]),
                  SamplingConfig())
    return stage, {"encoder": text_cfg["encoder"], "max_length": text_cfg["max_length"]}, state["step"]


def cascade_from_runs(run_dirs: Sequence, *, names: Optional[Sequence[str]] = None, ema: bool = True,
                      sampling: Optional[Sequence[Optional[Dict[str, Any]]]] = None,
                      steps: Optional[Sequence[Optional[int]]] = None,
                      extend: Optional[str] = None) -> tuple:
    """(ImagenCascade, [checkpoint step per stage]) from one run directory per stage.

    ``extend``: a cascade directory whose stages (weights, diffusion and sampling settings
    as saved) come first, the runs' stages after them (e.g. a super-resolution stage
    added to a trained cascade); ``names``, ``sampling`` and ``steps`` then index the runs
    only, and the step list has None for the extended cascade's stages."""
    from .core import normalize_names
    from .cascade import ImagenCascade
    if not run_dirs:
        raise ValueError("run_dirs: need one training run per stage")
    stages, texts, got = [], [], []
    if extend is not None:
        base = ImagenCascade.load(str(extend))
        if not base.text:
            raise ValueError(f"{extend}: the cascade names no text encoder (config 'text')")
        stages += list(base.stages)
        texts.append({k: base.text[k] for k in ("encoder", "max_length") if k in base.text})
        got += [None] * len(base.stages)
    for i, run in enumerate(run_dirs):
        stage, text, step = stage_from_run(
            run, name=names[i] if names else None, ema=ema,
            step=steps[i] if steps and i < len(steps) else None)
        if sampling and i < len(sampling) and sampling[i]:
            stage.sampling = stage.sampling.replace(**normalize_names(sampling[i]))
        stages.append(stage)
        texts.append(text)
        got.append(step)
    if any(t != texts[0] for t in texts):
        raise ValueError(f"the stages were trained with different text encoders: {texts}")
    return ImagenCascade(stages, text=texts[0]), got


_DTYPES = ("bf16", "fp16", "fp32")


def cmd_export(args) -> int:
    import torch

    from . import checkpoint as ck
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    try:
        sampling = json.loads(args.sampling) if args.sampling else None
        if sampling is not None and not isinstance(sampling, list):
            raise ValueError("--sampling: expected a JSON list with one object (or null) per stage")
        cascade, steps = cascade_from_runs(args.run, names=args.name or None, ema=not args.no_ema,
                                           sampling=sampling, extend=args.extend)
        cascade.save(args.out, dtype=dtypes[args.dtype])
    except (ValueError, ck.CheckpointError, json.JSONDecodeError, OSError) as e:
        print(f"imagen-fast: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a {len(steps)}-stage cascade to {args.out} "
          f"(checkpoint steps {steps}, {'EMA' if not args.no_ema else 'raw'} weights, {args.dtype})")
    return 0


def add_export_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("export", help="assemble a cascade directory from the stages' training runs")
    s.add_argument("--run", action="append", required=True,
                   help="a training run's out_dir, one per stage, base first (repeat)")
    s.add_argument("--name", action="append", help="stage names (repeat; default: preset names)")
    s.add_argument("--extend", help="a cascade directory whose stages come first, the runs' after "
                                    "(--name/--sampling then index the runs)")
    s.add_argument("--out", required=True, help="cascade directory to write")
    s.add_argument("--dtype", choices=_DTYPES, default="fp16", help="weights in the file")
    s.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    s.add_argument("--sampling", help='default sampling per stage as JSON, e.g. '
                                      '\'[{"guidance": 4, "steps": 32}, {"steps": 16}]\'')
    s.set_defaults(func=cmd_export)
    return s

