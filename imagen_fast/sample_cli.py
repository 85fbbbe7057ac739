"""`imagen-fast sample`: prompts in, image files out, with the shipped cascade or any other.

    imagen-fast sample "two red circles above a blue square" -o out.png
    imagen-fast sample --prompts-file prompts.txt --num-images 2 -o grid.png --each
    imagen-fast sample "a blue square on the left" --guidance 5,3 --steps 32 --sampler ddim

``--compile default|reduce-overhead|max-autotune`` runs each stage's whole denoising step
as one torch.compile graph (the call pays the compile time).

Per-stage options (--guidance, --steps, --sampler, --threshold, --percentile, --aug-level,
--start)
take one value for every stage or a comma-separated list, one per stage. Output: ``-o``
is one file, the image itself when there is one, else a grid of them all (a row per
prompt, a column per image); ``--each`` also writes every image as
``<stem>-p<prompt>-i<image><suffix>`` (numbered from 0). Every mistake a user can make
ends in one line on stderr and exit status 2, and is caught before any sampling starts.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from .core import COMPILE_MODES, SettingError, check_setting

# --compile's default: eager unless imagen_fast/bench/bench_compile.py shows that compiling pays
# back its compile time within one call of 4 images on a CPU (README, "Compiled steps").
DEFAULT_COMPILE = "none"

# The per-stage options: (setting, how a value is read). The values are checked by
# SamplingConfig's rules (imagen_fast.core.check_setting), as everywhere else.
_OPTIONS = {"guidance": float, "steps": int, "sampler": str, "threshold": str,
            "percentile": float, "aug_level": float, "start": float}


class SampleError(ValueError):
    """A user mistake: printed as one line."""


def _per_stage(text: Optional[str], name: str, parse):
    """'4' -> 4 (every stage), '4,2' -> [4, 2] (per stage); None stays None."""
    if text is None:
        return None
    flag = "--" + name.replace("_", "-")
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = parse(part)
        except ValueError:
            raise SampleError(f"{flag}: cannot read {part!r}") from None
        try:
            values.append(check_setting(name, value))
        except SettingError as e:
            raise SampleError(f"{flag}: {e.rule}, got {part!r}") from None
    return values[0] if len(values) == 1 else values


def read_prompts_file(path: str) -> List[str]:
    """One prompt a line (blank lines skipped), or a CSV with a ``Prompt`` column
    (DrawBench's layout)."""
    p = Path(path)
    if not p.is_file():
        raise SampleError(f"--prompts-file: no such file: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SampleError(f"--prompts-file: cannot read {path}: {e}") from None
    lines = text.splitlines()
    if p.suffix.lower() == ".csv" or (lines and "prompt" in [c.strip().lower() for c in lines[0].split(",")]):
        rows = list(csv.DictReader(lines))
        key = next((k for k in (rows[0].keys() if rows else []) if k and k.strip().lower() == "prompt"), None)
        if key is None:
            raise SampleError(f"--prompts-file: {path} is a CSV without a 'Prompt' column")
        prompts = [r[key].strip() for r in rows if r.get(key) and r[key].strip()]
    else:
        prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise SampleError(f"--prompts-file: {path} holds no prompts")
    return prompts


def _outputs(out: str, prompts: List[str], num_images: int, each: bool) -> List[Path]:
    """The files this run will write, checked to be writable before sampling: ``out``
    (the image, or the grid of all), then with ``each`` one file per image, prompt-major
    (the order the pipeline returns them in)."""
    path = Path(out)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise SampleError(f"-o: {out!r} needs an image suffix (.png, .jpg, .webp)")
    files = [path]
    if each:
        files += [path.with_name(f"{path.stem}-p{p}-i{i}{path.suffix}")
                  for p in range(len(prompts)) for i in range(num_images)]
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SampleError(f"-o: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise SampleError(f"-o: directory {str(parent)!r} is not writable")
    for f in files:
        if f.is_dir():
            raise SampleError(f"-o: {str(f)!r} is a directory")
        if f.exists() and not os.access(f, os.W_OK):
            raise SampleError(f"-o: {str(f)!r} is not writable")
    return files


def cmd_sample(args) -> int:
    try:
        return _run(args)
    except SampleError as e:
        print(f"imagen-fast: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    t_start = time.perf_counter()
    prompts = list(args.prompts)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    if not prompts:
        raise SampleError("give a prompt (or --prompts-file)")
    for p in prompts:
        if not p.strip():
            raise SampleError("empty prompt")
    if args.num_images < 1:
        raise SampleError(f"--num-images: must be a positive integer, got {args.num_images}")
    if args.stages is not None and args.stages < 1:
        raise SampleError(f"--stages: must be a positive integer, got {args.stages}")
    settings = {name: _per_stage(getattr(args, name), name, parse) for name, parse in _OPTIONS.items()}
    files = _outputs(args.output, prompts, args.num_images, args.each)

    import torch

    from .data.transforms import image_grid
    from .pipeline import load_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        pipe = load_pipeline(args.checkpoint, device=args.device, dtype=args.dtype, compile=args.compile)
        pipe.settings(**settings)                     # per-stage counts and values, before sampling
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        where = f"--checkpoint {args.checkpoint}: " if args.checkpoint else ""
        raise SampleError(f"{where}{e}") from None
    num_stages = len(pipe.cascade.stages)
    if args.stages is not None and args.stages > num_stages:
        raise SampleError(f"--stages: the cascade has {num_stages} stage(s), got {args.stages}")
    t_loaded = time.perf_counter()
    times = []
    try:
        images = pipe(prompts, num_images_per_prompt=args.num_images, seed=args.seed,
                      progress=not args.quiet, on_stage=lambda st, sec: times.append((st, sec)),
                      num_stages=args.stages, **settings)
    except ValueError as e:
        raise SampleError(str(e)) from None
    (images[0] if len(images) == 1 else image_grid(images, args.num_images)).save(files[0])
    for img, f in zip(images, files[1:]):
        img.save(f)
    if not args.quiet:
        stages = ", ".join(f"{st.name} {st.resolution}px {sec:.1f}s" for st, sec in times)
        compiled = "" if args.compile == "none" else f" (compile {args.compile}: stage times include compiling)"
        print(f"sampled {len(images)} image(s): load {t_loaded - t_start:.1f}s, {stages}; "
              f"total {time.perf_counter() - t_start:.1f}s{compiled}", file=sys.stderr)
    for f in files:
        print(f)
    return 0


def add_sample_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("sample", help="generate images from text prompts with a trained cascade",
                       description="Generate images from text prompts. Per-stage options take one "
                                   "value or a comma-separated list (one per stage).")
    s.add_argument("prompts", nargs="*", help="text prompt(s)")
    s.add_argument("-o", "--output", default="out.png",
                   help="the image file (default out.png): the image, or with several images one grid "
                        "of them all, a row per prompt and a column per image")
    s.add_argument("--num-images", type=int, default=4, help="images per prompt (default 4)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--prompts-file", help="one prompt a line, or a CSV with a Prompt column")
    s.add_argument("--each", action="store_true",
                   help="also write every image apart, as <stem>-p<prompt>-i<image>.png (from 0)")
    # --grid was needed for a grid before the grid became what -o writes: still accepted
    s.add_argument("--grid", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--stages", type=int, default=None, metavar="N",
                   help="stop after the first N stages (1: the base stage's images; default: "
                        "every stage, the cascade's full resolution)")
    s.add_argument("--guidance", help="classifier-free guidance weight w (>= 0; 1 = off)")
    s.add_argument("--steps", help="denoising steps")
    s.add_argument("--sampler", help="ddpm, ddim or dpmpp (DPM-Solver++ 2M)")
    s.add_argument("--threshold", help="none, static or dynamic")
    s.add_argument("--percentile", help="dynamic-thresholding percentile, a fraction in (0, 1]")
    s.add_argument("--aug-level", help="noise-augmentation level of the SR stages' input, [0, 1]")
    s.add_argument("--start", help="the time a stage starts from, (0, 1]: 1 = pure noise; below 1 "
                                   "(SR stages only, e.g. 1,1,0.25) its upsampled input diffused to that time")
    s.add_argument("--checkpoint", help="a cascade directory (default: the shipped cascade)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    s.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: fp32 on CPU, bf16 on CUDA)")
    s.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    s.add_argument("--compile", default=DEFAULT_COMPILE, choices=COMPILE_MODES,
                   help="torch.compile each stage's whole denoising step as one graph "
                        f"(reduce-overhead: CUDA graphs on a GPU; default {DEFAULT_COMPILE})")
    s.add_argument("--quiet", action="store_true", help="no progress bars or timing line")
    s.set_defaults(func=cmd_sample)
    return s
