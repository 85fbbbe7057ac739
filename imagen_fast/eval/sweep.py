"""Guidance sweep: the CLIP score vs FID trade-off curve (the paper's Fig. A.11).

For each guidance weight the same COCO captions are sampled with the same seeds, and
the samples get both an FID (against the whole set's cached reference statistics) and
a CLIP score. The weight goes to one stage (``stage=0``, the base model, by default;
the paper sweeps 1..10 there and 1..18 for super-resolution), the other stages keep
the system's settings; ``stage=None`` gives every stage the weight.

Writes ``sweep.json`` (every point) and ``sweep.png`` (CLIP score on x, FID on y, each
point labelled with its weight).
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

from .generator import System, with_settings


def num_stages(generator) -> Optional[int]:
    """How many stages a generator samples through, if it says."""
    for path in (("cascade", "stages"), ("stages",)):
        obj = generator
        try:
            for name in path:
                obj = getattr(obj, name)
            return len(obj)
        except (AttributeError, TypeError):
            continue
    n = getattr(generator, "num_stages", None)
    return int(n) if n is not None else None


def guidance_setting(system: System, weight: float, stage: Optional[int]):
    if stage is None:
        return float(weight)
    n = num_stages(system.generator)
    if n is None:
        raise ValueError(f"stage: system {system.label!r} does not say how many stages it has; "
                         f"sweep every stage (stage=None) instead")
    if not 0 <= stage < n:
        raise ValueError(f"stage: {stage} is not a stage of {system.label!r} (0..{n - 1})")
    current = system.settings.get("guidance")
    values = list(current) if isinstance(current, (list, tuple)) else [current] * n
    values[stage] = float(weight)
    return values


def run_sweep(system: System, guidances: Sequence[float], coco, extractor, clip_scorer, *,
              out_dir: str, stage: Optional[int] = 0, num: int = 1000, size: int = 256,
              seed: int = 0, batch_size: int = 8, cache_dir: Optional[str] = None,
              keep_samples: bool = False, progress: bool = False) -> dict:
    from .coco import CocoCaptions, load_coco
    from .fid import fid_coco

    guidances = [float(w) for w in guidances]
    if not guidances:
        raise ValueError("guidances: need at least one guidance weight")
    if not isinstance(coco, CocoCaptions):
        coco = load_coco(coco)
    os.makedirs(out_dir, exist_ok=True)
    points: List[dict] = []
    for w in guidances:
        point_system = with_settings(system, f"{system.label} w={w:g}",
                                     guidance=guidance_setting(system, w, stage))
        samples_dir = os.path.join(out_dir, "samples", f"w{w:g}") if keep_samples else None
        r = fid_coco(point_system, coco, extractor, num=num, size=size, seed=seed,
                     batch_size=batch_size, samples_dir=samples_dir, cache_dir=cache_dir,
                     clip_scorer=clip_scorer, progress=progress)
        points.append({"guidance": w, "fid": r["fid"], "clip_score": r["clip_score"],
                       "settings": point_system.settings})
    result = {"system": system.describe(), "stage": stage, "num": num, "size": size,
              "seed": seed, "extractor": extractor.identity, "clip_model": clip_scorer.identity,
              "captions_file": coco.captions_file, "points": points}
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    result["plot"] = plot_tradeoff(points, os.path.join(out_dir, "sweep.png"),
                                   title=f"{system.label}: guidance sweep"
                                         f"{'' if stage is None else f' (stage {stage})'}, "
                                         f"{num} COCO captions")
    return result


def plot_tradeoff(points: Sequence[dict], path: str, title: str = "") -> str:
    """CLIP score (x) vs FID (y), points joined in guidance order and labelled."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the sweep's plot needs matplotlib (pip install matplotlib, or "
                          "imagen-fast[eval])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(points, key=lambda p: p["guidance"])
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    xs, ys = [p["clip_score"] for p in pts], [p["fid"] for p in pts]
    ax.plot(xs, ys, "-o", color="tab:blue")
    for p in pts:
        ax.annotate(f"w={p['guidance']:g}", (p["clip_score"], p["fid"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("CLIP score")
    ax.set_ylabel("FID")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
