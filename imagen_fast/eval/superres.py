"""`imagen-fast eval sr`: one super-resolution stage alone against bicubic upsampling.

Ground truth is what the stage was trained to produce: shapes scenes of the caption
combinations held out of training (``make_scene(seed, i, "heldout")``), rendered at the
stage's resolution. Each truth image is downsampled to the stage's low-res resolution the
way training made its condition (PIL bicubic, antialiased), then upsampled back two ways:
by the stage (its own sampling settings unless overridden, the scene's caption as the text
condition) and by PIL bicubic. Both are scored against the truth as 8-bit images:

* PSNR = 10 log10(255^2 / MSE) per image over all pixels and channels, then averaged;
* SSIM (Wang et al. 2004) per image: an 11x11 Gaussian window of sigma 1.5, K1 = 0.01,
  K2 = 0.03, L = 255, per RGB channel over the positions where the window fits (no
  padding), averaged over positions and channels; then averaged over images.

The report gives both systems, the difference, and a contact sheet (truth | bicubic |
stage | low-res input) of the first images.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _as_float_images(images) -> torch.Tensor:
    """PIL images or a uint8/float array (N, H, W, 3) or (H, W, 3) -> float64 (N, 3, H, W)
    in [0, 255]."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    a = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"images: expected (N, H, W, 3) RGB, got shape {tuple(a.shape)}")
    return a.permute(0, 3, 1, 2)


def psnr(images, truth) -> List[float]:
    """Per-image PSNR in dB of 8-bit RGB ``images`` against ``truth`` (inf when equal)."""
    x, y = _as_float_images(images), _as_float_images(truth)
    if x.shape != y.shape:
        raise ValueError(f"images {tuple(x.shape)} and truth {tuple(y.shape)} differ in shape")
    mse = (x - y).pow(2).flatten(1).mean(1)
    return [math.inf if m == 0 else 10.0 * math.log10(255.0 ** 2 / m) for m in mse.tolist()]


def _gaussian_window() -> torch.Tensor:
    r = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-r ** 2 / (2 * SSIM_SIGMA ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]              # (1, 1, 11, 11)


def ssim(images, truth) -> List[float]:
    """Per-image SSIM of 8-bit RGB ``images`` against ``truth`` (see the module docstring)."""
    x, y = _as_float_images(images), _as_float_images(truth)
    if x.shape != y.shape:
        raise ValueError(f"images {tuple(x.shape)} and truth {tuple(y.shape)} differ in shape")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"images must be at least {SSIM_WINDOW}x{SSIM_WINDOW} for SSIM")
    c, h, w = x.shape[1:]
    win = _gaussian_window()

    def blur(t):
        return F.conv2d(t.reshape(c, 1, h, w), win)

    c1, c2 = (SSIM_K1 * 255.0) ** 2, (SSIM_K2 * 255.0) ** 2
    out = []
    for xi, yi in zip(x, y):             # one image at a time: float64 maps of a batch add up
        mx, my = blur(xi), blur(yi)
        vx, vy, cxy = blur(xi * xi) - mx * mx, blur(yi * yi) - my * my, blur(xi * yi) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(float(s.mean()))
    return out


def heldout_truth(num: int, resolution: int, lowres: int, seed: int = 0):
    """``num`` held-out scenes: (captions, truth images at ``resolution``, their
    ``lowres`` versions), all PIL."""
    from PIL import Image

    from ..data.shapes import make_scene, render

    if num < 1:
        raise ValueError(f"num: must be >= 1, got {num}")
    captions, truth, low = [], [], []
    for i in range(num):
        scene = make_scene(seed, i, "heldout")
        img, _ = render(scene, resolution)
        captions.append(scene["caption"])
        truth.append(img)
        low.append(img.resize((lowres, lowres), Image.BICUBIC))
    return captions, truth, low


def bicubic_up(low: Sequence[Any], resolution: int) -> List[Any]:
    from PIL import Image
    return [im.resize((resolution, resolution), Image.BICUBIC) for im in low]


def run_stage(pipe, stage_index: int, captions: Sequence[str], low: Sequence[Any], *,
              seed: int = 0, batch_size: int = 8, overrides: Optional[Dict[str, Any]] = None,
              progress=None) -> Tuple[List[Any], Dict[str, Any]]:
    """The stage alone on the low-res images: PIL outputs and the settings used."""
    from ..data.transforms import to_pil, to_tensor
    from ..diffusion import sample

    stages = pipe.cascade.stages
    if not 0 <= stage_index < len(stages):
        raise ValueError(f"stage: expected an index in [0, {len(stages)}), got {stage_index}")
    st = stages[stage_index]
    if not st.is_sr:
        raise ValueError(f"stage {stage_index} ({st.name}) is not a super-resolution stage")
    cfg = st.sampling.replace(**(overrides or {}))
    param = next(st.unet.parameters())
    generator = torch.Generator(param.device).manual_seed(seed)
    outputs: List[Any] = []
    for b in range(0, len(captions), batch_size):
        chunk = list(captions[b:b + batch_size])
        emb, mask = pipe.text_encoder.encode(chunk)
        lowres = torch.stack([to_tensor(im) for im in low[b:b + batch_size]])
        x = sample(st.unet, st.diffusion, (len(chunk), 3, st.resolution, st.resolution),
                   text_embeds=emb.to(param.device), text_mask=mask.to(param.device),
                   lowres=lowres.to(param.device, param.dtype), aug_level=cfg.aug_level,
                   guidance=cfg.guidance, sampler=cfg.sampler, steps=cfg.steps, eta=cfg.eta,
                   threshold=cfg.threshold, percentile=cfg.percentile, start=cfg.start,
                   generator=generator, device=param.device, dtype=param.dtype).clamp(-1.0, 1.0)
        outputs += [to_pil(img.float().cpu()) for img in x]
        if progress:
            progress(len(outputs), len(captions))
    return outputs, cfg.to_dict()


def _summary(values: List[float]) -> Dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "min": float(a.min()),
            "max": float(a.max())}


def evaluate(pipe, *, stage: int = -1, num: int = 200, seed: int = 0, batch_size: int = 8,
             overrides: Optional[Dict[str, Any]] = None, progress=None):
    """Score one SR stage and bicubic on ``num`` held-out scenes; returns (report, images)."""
    stages = pipe.cascade.stages
    index = stage % len(stages) if -len(stages) <= stage < len(stages) else stage
    if not 0 <= index < len(stages):
        raise ValueError(f"stage: expected an index in [-{len(stages)}, {len(stages)}), got {stage}")
    st = stages[index]
    if not st.is_sr:
        raise ValueError(f"stage {index} ({st.name}) is not a super-resolution stage")
    captions, truth, low = heldout_truth(num, st.resolution, st.lowres_resolution, seed)
    t0 = time.perf_counter()
    model_out, settings = run_stage(pipe, index, captions, low, seed=seed, batch_size=batch_size,
                                    overrides=overrides, progress=progress)
    seconds = time.perf_counter() - t0
    bicubic = bicubic_up(low, st.resolution)
    per = {"stage": {"psnr": psnr(model_out, truth), "ssim": ssim(model_out, truth)},
           "bicubic": {"psnr": psnr(bicubic, truth), "ssim": ssim(bicubic, truth)}}
    results = {name: {metric: _summary(v) for metric, v in m.items()} for name, m in per.items()}
    report = {
        "stage": {"index": index, "name": st.name, "resolution": st.resolution,
                  "lowres_resolution": st.lowres_resolution, "sampling": settings},
        "num": num, "seed": seed, "seconds": seconds, "results": results,
        "psnr_gain_db": results["stage"]["psnr"]["mean"] - results["bicubic"]["psnr"]["mean"],
        "ssim_gain": results["stage"]["ssim"]["mean"] - results["bicubic"]["ssim"]["mean"],
        "per_image": [{"caption": c, "stage_psnr": a, "bicubic_psnr": b, "stage_ssim": s,
                       "bicubic_ssim": t}
                      for c, a, b, s, t in zip(captions, per["stage"]["psnr"], per["bicubic"]["psnr"],
                                               per["stage"]["ssim"], per["bicubic"]["ssim"])],
    }
    return report, {"truth": truth, "bicubic": bicubic, "stage": model_out, "lowres": low}


def report_markdown(report: Dict[str, Any]) -> str:
    st, r = report["stage"], report["results"]
    lines = [f"# Super-resolution stage alone vs bicubic: {st['name']} "
             f"({st['lowres_resolution']} -> {st['resolution']} px)", "",
             f"{report['num']} held-out shapes scenes (seed {report['seed']}), rendered at "
             f"{st['resolution']} px and downsampled to {st['lowres_resolution']} px (PIL bicubic); "
             f"stage settings {json.dumps(st['sampling'])}; {report['seconds']:.0f} s of sampling.", "",
             "| system | PSNR mean (dB) | PSNR median | SSIM mean | SSIM median |",
             "|---|---|---|---|---|"]
    for name, label in (("bicubic", "bicubic upsampling"), ("stage", st["name"])):
        p, s = r[name]["psnr"], r[name]["ssim"]
        lines.append(f"| {label} | {p['mean']:.2f} | {p['median']:.2f} | {s['mean']:.4f} | {s['median']:.4f} |")
    lines += ["", f"PSNR gain over bicubic: {report['psnr_gain_db']:+.2f} dB; "
              f"SSIM gain: {report['ssim_gain']:+.4f}.", "",
              "PSNR and SSIM on 8-bit RGB against the full-resolution render; SSIM with an 11x11 "
              "Gaussian window (sigma 1.5), no padding, averaged over channels."]
    return "\n".join(lines) + "\n"


def contact_sheet(images: Dict[str, List[Any]], rows: int = 6):
    """truth | bicubic | stage | low-res input (nearest-upscaled), a row per scene."""
    from PIL import Image

    order = ("truth", "bicubic", "stage", "lowres")
    size = images["truth"][0].size[0]
    rows = min(rows, len(images["truth"]))
    sheet = Image.new("RGB", (len(order) * size, rows * size), "white")
    for r in range(rows):
        for c, name in enumerate(order):
            im = images[name][r]
            if im.size[0] != size:
                im = im.resize((size, size), Image.NEAREST)
            sheet.paste(im, (c * size, r * size))
    return sheet


def cmd_eval_sr(args) -> int:
    from ..pipeline import load_pipeline

    def fail(msg):
        print(f"imagen-fast: error: {msg}", file=sys.stderr)
        return 2

    if args.num < 1 or args.batch_size < 1:
        return fail("--num and --batch-size must be >= 1")
    overrides = {k: v for k, v in (("steps", args.steps), ("sampler", args.sampler),
                                   ("aug_level", args.aug_level), ("start", args.start),
                                   ("threshold", args.threshold)) if v is not None}
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        pipe = load_pipeline(args.checkpoint, device=args.device)

        def progress(done, total):
            if not args.quiet:
                print(f"\reval sr: {done}/{total} images", end="\n" if done == total else "",
                      file=sys.stderr, flush=True)
        report, images = evaluate(pipe, stage=args.stage, num=args.num, seed=args.seed,
                                  batch_size=args.batch_size, overrides=overrides, progress=progress)
    except (ValueError, OSError) as e:
        return fail(e)
    report["checkpoint"] = str(args.checkpoint or "shipped")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    md = report_markdown(report)
    (out / "report.md").write_text(md)
    contact_sheet(images).save(out / "samples.png")
    print(md)
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'samples.png'}")
    return 0


def add_sr_eval_parser(eval_sub) -> argparse.ArgumentParser:
    s = eval_sub.add_parser("sr", help="one super-resolution stage alone vs bicubic (PSNR, SSIM) "
                                       "on held-out shapes renders")
    s.add_argument("--checkpoint", help="a cascade directory (default: the shipped cascade)")
    s.add_argument("--stage", type=int, default=-1, help="stage index (default: the last)")
    s.add_argument("--num", type=int, default=200, help="held-out scenes")
    s.add_argument("--steps", type=int, default=None, help="override the stage's step count")
    s.add_argument("--sampler", default=None, help="override the stage's sampler")
    s.add_argument("--aug-level", type=float, default=None, help="override the stage's aug level")
    s.add_argument("--start", type=float, default=None,
                   help="override the stage's start time (1 = from pure noise)")
    s.add_argument("--threshold", default=None, help="override the stage's thresholding")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.add_argument("--out", default="eval-sr", help="directory for report.json/.md and samples.png")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_eval_sr)
    return s
