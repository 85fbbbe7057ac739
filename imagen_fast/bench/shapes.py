"""The Imagen shape table: every op call a preset's U-Net makes, read off the model itself.

Each preset is built on the meta device (no memory, no arithmetic) and run forward once
under a dispatch mode that records the arguments of every ``imagen_fast`` custom op it
reaches, so the table follows the presets as they are, never a list typed by hand.

    imagen-fast bench shapes                                  (or:)
    python -m imagen_fast.bench.shapes [--presets base64,sr256] [--text-lens 64,128,256] [--json]

A recorded call has batch 1; ``at_batch`` scales it (guided sampling runs 2B).
  group_norm_silu  (N, C, H, W), groups, FiLM or not, activation; where in the model
  attention        (B, heads, Lq, Lk, D): "self+text" (image tokens over image + text
                   tokens), "cross" (image over text), "pool" (text pooling, Lq = 1)
  dynamic_threshold / sampler_step  the preset's output image (N, 3, H, W)
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TEXT_LENS = (64, 128, 256)
BATCHES = (1, 8, 64)


@dataclass(frozen=True)
class ImageShape:
    """An (N, C, H, W) tensor of a preset: its output image, or a feature map."""
    preset: str
    n: int
    c: int
    h: int
    w: int

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    def at_batch(self, batch: int):
        return replace(self, n=batch)


@dataclass(frozen=True)
class GNCall(ImageShape):
    groups: int
    film: bool
    activation: str


@dataclass(frozen=True)
class AttnCall:
    preset: str
    b: int
    heads: int
    lq: int
    lk: int
    d: int
    text_len: int
    kind: str          # "self+text" | "cross" | "pool"
    masked: bool

    @property
    def shape(self) -> Tuple[int, int, int, int, int]:
        return (self.b, self.heads, self.lq, self.lk, self.d)

    def at_batch(self, batch: int) -> "AttnCall":
        return replace(self, b=batch)


class _Recorder(TorchDispatchMode):
    """Records the imagen_fast custom ops a forward reaches (their fake kernels run)."""

    def __init__(self):
        super().__init__()
        self.calls: List[Tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("imagen_fast::"):
            self.calls.append((name.split("::", 1)[1], args))
        return func(*args, **(kwargs or {}))


@lru_cache(maxsize=None)
def _record(preset: str, text_len: int) -> Tuple[Tuple[str, tuple], ...]:
    from imagen_fast.models import build_unet, preset_config
    cfg = preset_config(preset)
    model = build_unet(preset, device="meta").eval()
    res = cfg["image_size"]
    meta = torch.device("meta")
    x = torch.empty(1, 3, res, res, device=meta)
    t = torch.empty(1, device=meta)
    kw = {}
    if cfg.get("text_dim"):
        kw["text_embeds"] = torch.empty(1, text_len, cfg["text_dim"], device=meta)
        kw["text_mask"] = torch.empty(1, text_len, dtype=torch.bool, device=meta)
    if cfg["stage"] == "sr":
        kw["lowres"] = torch.empty(1, 3, cfg["lowres_size"], cfg["lowres_size"], device=meta)
        kw["aug_level"] = torch.empty(1, device=meta)
    rec = _Recorder()
    with torch.no_grad(), rec:
        model(x, t, **kw)
    out = []
    for name, args in rec.calls:
        out.append((name, tuple(_describe(a) for a in args)))
    return tuple(out)


def _describe(a):
    """Meta tensors -> ('T', shape, dtype); other arguments as they are."""
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), str(a.dtype))
    if isinstance(a, (list, tuple)):
        return tuple(_describe(v) for v in a)
    return a


def preset_calls(preset: str, text_len: int = 64) -> Dict[str, Counter]:
    """op -> Counter(call -> times per forward) for one U-Net forward at batch 1."""
    gn: Counter = Counter()
    attn: Counter = Counter()
    for name, args in _record(preset, text_len):
        if name == "group_norm_silu_fwd":
            (_, shape, _), groups, _w, _b, _eps, scale, _shift, act = args
            n, c, h, w = shape
            gn[GNCall(preset, n, c, h, w, groups, scale is not None, act)] += 1
        elif name == "attention_fwd":
            (_, (b, heads, lq, d), _), (_, kshape, _), _v, mask, _scale = args
            lk = kshape[2]
            kind = "pool" if lq == 1 else ("cross" if lk == text_len else "self+text")
            attn[AttnCall(preset, b, heads, lq, lk, d, text_len, kind, mask is not None)] += 1
    return {"group_norm_silu": gn, "attention": attn}


def image_shape(preset: str) -> ImageShape:
    from imagen_fast.models import preset_config
    res = preset_config(preset)["image_size"]
    return ImageShape(preset, 1, 3, res, res)


def gn_shapes(presets: Sequence[str]) -> List[GNCall]:
    """Distinct group_norm_silu calls of the presets (text length does not change them)."""
    seen: Dict[GNCall, None] = {}
    for p in presets:
        for call in preset_calls(p)["group_norm_silu"]:
            seen.setdefault(call, None)
    return list(seen)


def attn_shapes(presets: Sequence[str], text_lens: Sequence[int] = TEXT_LENS) -> List[AttnCall]:
    seen: Dict[AttnCall, None] = {}
    for p in presets:
        for tl in text_lens:
            for call in preset_calls(p, tl)["attention"]:
                seen.setdefault(call, None)
    return list(seen)


def stage_calls(preset: str) -> List[GNCall]:
    """For each resolution of a preset, the group_norm_silu call that moves the most
    bytes per forward (calls x size; FiLM'd first on a tie), highest resolution first."""
    best: Dict[int, Tuple[Tuple[int, bool], GNCall]] = {}
    for call, count in preset_calls(preset)["group_norm_silu"].items():
        weight = (count * call.c * call.h * call.w, call.film)
        if call.h not in best or weight > best[call.h][0]:
            best[call.h] = (weight, call)
    return [best[h][1] for h in sorted(best, reverse=True)]


def table_rows(presets: Sequence[str], text_lens: Sequence[int] = TEXT_LENS) -> List[dict]:
    """One row per distinct call: op, preset, shape at batch 1, calls per forward."""
    rows = []
    for p in presets:
        gn = preset_calls(p)["group_norm_silu"]
        for call, count in sorted(gn.items(), key=lambda kv: (-kv[0].h, kv[0].c)):
            rows.append(dict(op="group_norm_silu", preset=p, shape="x".join(map(str, call.shape)),
                             detail=f"groups {call.groups}, {'FiLM, ' if call.film else ''}"
                                    f"act {call.activation}", per_forward=count))
        for tl in text_lens:
            attn = preset_calls(p, tl)["attention"]
            for call, count in sorted(attn.items(), key=lambda kv: (-kv[0].lq, kv[0].kind)):
                rows.append(dict(op="attention", preset=p, shape="x".join(map(str, call.shape)),
                                 detail=f"{call.kind}, text {tl}, "
                                        f"{'mask' if call.masked else 'no mask'}",
                                 per_forward=count))
        img = image_shape(p)
        for op in ("dynamic_threshold", "sampler_step"):
            rows.append(dict(op=op, preset=p, shape="x".join(map(str, img.shape)),
                             detail="once per denoising step", per_forward=1))
    return rows


def markdown(presets: Sequence[str], text_lens: Sequence[int] = TEXT_LENS,
             batches: Sequence[int] = BATCHES) -> str:
    lines = ["# Imagen shape table", "",
             "Every op call of one U-Net forward, recorded from the presets on the meta device "
             "(`imagen-fast bench shapes`). Shapes at batch 1; the batch dimension scales "
             f"with the batch size (benchmarked at {', '.join(map(str, batches))}; guided "
             "sampling doubles it).", "",
             "| op | preset | shape (batch 1) | detail | calls per forward |", "|---|---|---|---|---|"]
    for r in table_rows(presets, text_lens):
        lines.append(f"| {r['op']} | {r['preset']} | {r['shape']} | {r['detail']} | {r['per_forward']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from imagen_fast.models import PRESETS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--text-lens", default=",".join(map(str, TEXT_LENS)))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        ap.error(f"unknown presets {unknown}; known: {sorted(PRESETS)}")
    lens = [int(v) for v in args.text_lens.split(",")]
    if args.json:
        print(json.dumps(table_rows(presets, lens), indent=1))
    else:
        print(markdown(presets, lens), end="")


if __name__ == "__main__":
    main()


__all__ = ["GNCall", "AttnCall", "ImageShape", "preset_calls", "gn_shapes", "attn_shapes",
           "stage_calls", "image_shape", "table_rows", "markdown"]
