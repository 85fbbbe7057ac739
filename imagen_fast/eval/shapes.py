"""`imagen-fast eval shapes`: compositional accuracy on caption combinations held out from
training, scored by the analytic checker (``shapes_checker``).

The prompts are combinations of the shapes grammar that the ``train`` split never shows
(``imagen_fast.data.combination_space("heldout")``), drawn with a fixed seed, half with one
group of objects and half with two. Every image is scored on colour, count, shape and
position; a setting's report gives each attribute's accuracy over all images, ``overall``
(the mean of the four, as DrawBench averages its categories) and ``all`` (every attribute
right at once), split by one- and two-group prompts too.

Settings compared (each over the same prompts and seeds):
* ``default``: the checkpoint's own sampling settings;
* ``no guidance``: guidance weight 1 on every stage;
* ``static w=W`` / ``dynamic w=W``: high guidance W (>= 5) on the base stage with static
  clipping vs the paper's dynamic thresholding.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..data.shapes import combination_space, parse_caption
from .shapes_checker import ATTRIBUTES, check_image


def heldout_prompts(num: int, seed: int = 0) -> List[str]:
    """``num`` held-out combinations, half one-group and half two-group (seeded)."""
    if num < 1:
        raise ValueError(f"num: must be >= 1, got {num}")
    space = combination_space("heldout")
    rng = random.Random(f"imagen-fast-eval-shapes/{seed}")
    one = [r["caption"] for r in space if not r["relation"]]
    two = [r["caption"] for r in space if r["relation"]]
    n_one = min(len(one), num // 2)
    return rng.sample(one, n_one) + rng.sample(two, min(len(two), num - n_one))


def score(images, prompts: Sequence[str], images_per_prompt: int) -> Dict[str, Any]:
    """Accuracy per attribute for images in prompt-major order."""
    rows = []
    for i, img in enumerate(images):
        prompt = prompts[i // images_per_prompt]
        scene = parse_caption(prompt)
        if scene is None:
            raise ValueError(f"prompts: {prompt!r} is not in the shapes grammar")
        verdict = check_image(img, scene).as_dict()
        rows.append({"prompt": prompt, "groups": len(scene["objects"]), **verdict})
    return {"summary": summarise(rows), "images": rows}


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    def acc(rs):
        if not rs:
            return None
        out = {a: sum(r[a] for r in rs) / len(rs) for a in ATTRIBUTES}
        out["overall"] = sum(out[a] for a in ATTRIBUTES) / len(ATTRIBUTES)
        out["all"] = sum(r["all"] for r in rs) / len(rs)
        out["images"] = len(rs)
        return out
    return {"all prompts": acc(rows), "one group": acc([r for r in rows if r["groups"] == 1]),
            "two groups": acc([r for r in rows if r["groups"] == 2])}


def settings_to_compare(pipe, high_guidance: float) -> Dict[str, Dict[str, Any]]:
    if high_guidance < 5:
        raise ValueError(f"high_guidance: the thresholding comparison needs w >= 5, got {high_guidance}")
    n = len(pipe.cascade.stages)
    high = [high_guidance] + [None] * (n - 1)
    return {
        "default": {},
        "no guidance": {"guidance": 1.0},
        f"static w={high_guidance:g}": {"guidance": high, "threshold": ["static"] + [None] * (n - 1)},
        f"dynamic w={high_guidance:g}": {"guidance": high, "threshold": ["dynamic"] + [None] * (n - 1)},
    }


def run_eval(pipe, *, num_prompts: int = 64, images_per_prompt: int = 2, seed: int = 0,
             high_guidance: float = 7.0, batch_prompts: int = 8,
             settings: Optional[Dict[str, Dict[str, Any]]] = None,
             overrides: Optional[Dict[str, Any]] = None, progress=None) -> Dict[str, Any]:
    """Sample and score every setting; returns the report (settings, prompts, results,
    and per-setting sampling seconds). ``overrides`` (e.g. ``{"steps": 16}``) apply to
    every setting; ``progress(done, total)`` is called after every batch."""
    prompts = heldout_prompts(num_prompts, seed)
    settings = settings if settings is not None else settings_to_compare(pipe, high_guidance)
    overrides = dict(overrides or {})
    results, images_out = {}, {}
    batches = [prompts[i:i + batch_prompts] for i in range(0, len(prompts), batch_prompts)]
    total, done = len(batches) * len(settings), 0
    for name, kw in settings.items():
        kw = {**kw, **{k: v for k, v in overrides.items() if k not in kw}}
        t0 = time.perf_counter()
        images = []
        for b, chunk in enumerate(batches):
            images += pipe(chunk, num_images_per_prompt=images_per_prompt, seed=seed * 1000 + b, **kw)
            done += 1
            if progress:
                progress(done, total)
        result = score(images, prompts, images_per_prompt)
        result["seconds"] = time.perf_counter() - t0
        result["settings"] = {k: v for k, v in kw.items()}
        results[name] = result
        images_out[name] = images
    return {"prompts": prompts, "images_per_prompt": images_per_prompt, "seed": seed,
            "stages": [dict(name=st.name, sampling=st.sampling.to_dict())
                       for st in pipe.cascade.stages],
            "results": results}, images_out


def report_markdown(report: Dict[str, Any]) -> str:
    lines = [f"# Shapes evaluation: {len(report['prompts'])} held-out prompts x "
             f"{report['images_per_prompt']} images (seed {report['seed']})", "",
             "| setting | prompts | colour | count | shape | position | overall | all correct | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, res in report["results"].items():
        for part, acc in res["summary"].items():
            if acc is None:
                continue
            lines.append(f"| {name} | {part} | " + " | ".join(f"{100 * acc[a]:.1f}%" for a in ATTRIBUTES)
                         + f" | {100 * acc['overall']:.1f}% | {100 * acc['all']:.1f}% | "
                         + (f"{res['seconds']:.0f}" if part == "all prompts" else "") + " |")
    lines += ["", "Accuracy per attribute over all images; overall = mean of the four; "
              "all correct = every attribute right in the same image."]
    return "\n".join(lines) + "\n"


def contact_sheet(images: Dict[str, List[Any]], prompts: Sequence[str], images_per_prompt: int,
                  max_prompts: int = 8):
    """One PNG: a row per prompt, the images of every setting side by side."""
    from PIL import Image, ImageDraw

    names = list(images)
    w, h = images[names[0]][0].size
    label_w, cols = 8 * 44, len(names) * images_per_prompt
    rows = min(max_prompts, len(prompts))
    sheet = Image.new("RGB", (label_w + cols * w, 14 + rows * h), "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(names):
        draw.text((label_w + j * images_per_prompt * w + 2, 1), name, fill="black")
    for r in range(rows):
        draw.text((2, 14 + r * h + h // 2 - 6), prompts[r][:56], fill="black")
        for j, name in enumerate(names):
            for k in range(images_per_prompt):
                sheet.paste(images[name][r * images_per_prompt + k],
                            (label_w + (j * images_per_prompt + k) * w, 14 + r * h))
    return sheet


def cmd_eval_shapes(args) -> int:
    from ..pipeline import load_pipeline

    def fail(msg):
        print(f"imagen-fast: error: {msg}", file=sys.stderr)
        return 2

    if args.num_prompts < 1 or args.images_per_prompt < 1:
        return fail("--num-prompts and --images-per-prompt must be >= 1")
    if args.high_guidance < 5:
        return fail(f"--high-guidance: must be >= 5 (the paper's high-guidance regime), got {args.high_guidance}")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        pipe = load_pipeline(args.checkpoint, device=args.device)
    except (ValueError, OSError) as e:
        return fail(e)
    overrides = {"steps": args.steps} if args.steps else {}

    def progress(done, total):
        if not args.quiet:
            print(f"\reval shapes: batch {done}/{total}", end="\n" if done == total else "",
                  file=sys.stderr, flush=True)
    report, images = run_eval(pipe, num_prompts=args.num_prompts, images_per_prompt=args.images_per_prompt,
                              seed=args.seed, high_guidance=args.high_guidance, overrides=overrides,
                              progress=progress)
    report["checkpoint"] = str(args.checkpoint or "shipped")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    md = report_markdown(report)
    (out / "report.md").write_text(md)
    contact_sheet(images, report["prompts"], args.images_per_prompt).save(out / "samples.png")
    print(md)
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'samples.png'}")
    return 0


def add_shapes_eval_parser(eval_sub) -> argparse.ArgumentParser:
    s = eval_sub.add_parser("shapes", help="compositional accuracy on held-out shapes captions")
    s.add_argument("--checkpoint", help="a cascade directory (default: the shipped cascade)")
    s.add_argument("--num-prompts", type=int, default=64)
    s.add_argument("--images-per-prompt", type=int, default=2)
    s.add_argument("--high-guidance", type=float, default=7.0,
                   help="guidance weight of the static-vs-dynamic thresholding comparison (>= 5)")
    s.add_argument("--steps", type=int, default=0, help="override every stage's step count")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.add_argument("--out", default="eval-shapes", help="directory for report.json/.md and samples.png")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_eval_shapes)
    return s
