"""An analytic checker for images of the synthetic shapes grammar (imagen_fast.data.shapes).

Given an image and the scene its caption asks for (``parse_caption``), it finds the
objects by colour segmentation and scores four attributes, DrawBench-style:

* colour: every named colour is present (at least ``MIN_OBJECT_PIXELS`` of it, scaled
  to the image size), and no other palette colour covers more than a quarter as many
  pixels as the named ones;
* count: each group has exactly its number of objects (connected components of its
  colour; when both groups share a colour, each takes the components of its shape);
* shape: most of each group's objects have its shape, classified from its coverage in
  its bounding box: the share of it in the top half (a triangle, apex up, holds a
  quarter) and how full the box's corners are (square ~1, circle ~0.3);
* position: the group's centroid lies in the named region (left/right/top/bottom
  half, or the central square), or, for two groups, their centroids are in the named
  relation with a margin.

Each pixel is read as a blend of the background (estimated from the image border) and
the palette colour that explains it best (``coverage``); an object is a connected region
its colour covers at least half of, and off-palette noise belongs to nothing. The checker scores the dataset's
own renders near 100% (tests/eval/test_eval_shapes.py), so what it reports for generated
images is the model's error, not the checker's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..data.shapes import COLOURS

MAX_COLOUR_DISTANCE = 70.0
MIN_OBJECT_PIXELS = 15           # at 64x64 (the smallest shape covers ~40); scaled by (size / 64)^2
# Measured on 1000 renders at 64 px: triangles' top share 0.24-0.35, circles' and
# squares' 0.43-0.56; circles' corner fill 0-0.40, squares' 0.56-1.
TRIANGLE_TOP_SHARE = 0.39
SQUARE_CORNER_FILL = 0.48
POSITION_MARGIN = 0.06           # fraction of the image
ATTRIBUTES = ("colour", "count", "shape", "position")

_NAMES = sorted(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _NAMES], dtype=np.float32)


@dataclass
class Blob:
    colour: str
    area: float                              # pixels covered (soft)
    bbox: Tuple[int, int, int, int]          # x0, y0, x1, y1 (exclusive)
    centroid: Tuple[float, float]            # x, y in pixels
    fill: float                              # area / bbox area
    top_share: float                         # share of the area in the bbox's top half
    corner_fill: float                       # coverage of the bbox's four corner cells

    @property
    def shape(self) -> str:
        """Triangles (apex up) hold a quarter of their area in their top half; squares
        fill their bounding box's corners, circles leave them mostly empty."""
        if self.top_share < TRIANGLE_TOP_SHARE:
            return "triangle"
        return "square" if self.corner_fill >= SQUARE_CORNER_FILL else "circle"


def _shape_features(soft: np.ndarray) -> Tuple[float, float, float]:
    """(fill, top share, corner fill) of one object's coverage inside its bbox."""
    h, w = soft.shape
    area = float(soft.sum())
    top = float(soft[: h // 2].sum() + (0.5 * soft[h // 2].sum() if h % 2 else 0.0))
    ch, cw = max(1, round(h / 4)), max(1, round(w / 4))
    corners = [soft[:ch, :cw], soft[:ch, -cw:], soft[-ch:, :cw], soft[-ch:, -cw:]]
    corner = float(sum(c.sum() for c in corners)) / (4 * ch * cw)
    return area / max(1, h * w), top / max(area, 1e-6), corner


@dataclass
class Check:
    """The verdict on one image: per-attribute booleans and what was found."""
    colour: bool
    count: bool
    shape: bool
    position: bool
    found: Dict[str, List[Blob]] = field(default_factory=dict)

    @property
    def all_correct(self) -> bool:
        return self.colour and self.count and self.shape and self.position

    def as_dict(self) -> Dict[str, bool]:
        return {a: getattr(self, a) for a in ATTRIBUTES} | {"all": self.all_correct}


def _background(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def coverage(img: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per pixel: (index of the palette colour that best explains it, its coverage).

    A pixel is modelled as a blend bg + a (c - bg) of the background and one palette
    colour c, a in [0, 1]: the colour whose blend line passes nearest wins, and ``a`` is
    how much of the pixel it covers. The index is -2 when no blend line passes within
    ``MAX_COLOUR_DISTANCE`` (an off-palette pixel). Modelling edges as blends keeps an
    anti-aliased yellow-on-black rim from reading as orange."""
    px = img.astype(np.float32)[:, :, None, :]                                # (H, W, 1, 3)
    bg = _background(img)
    d = (_PALETTE - bg)[None, None]                                           # (1, 1, P, 3)
    a = ((px - bg) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-6)           # (H, W, P)
    a = np.clip(a, 0.0, 1.0)
    dist = np.linalg.norm(px - (bg + a[..., None] * d), axis=-1)
    best = dist.argmin(-1)
    alpha = np.take_along_axis(a, best[..., None], -1)[..., 0]
    far = np.take_along_axis(dist, best[..., None], -1)[..., 0] > MAX_COLOUR_DISTANCE
    return np.where(far, -2, best), np.where(far, 0.0, alpha)


def components(mask: np.ndarray) -> List[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x) coordinates."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pts = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(pts))
    return out


def find_blobs(img: np.ndarray) -> Dict[str, List[Blob]]:
    """Objects of every palette colour: {colour: [Blob]}: connected components of the
    pixels it covers at least half of, at least the minimum size. A blob's area is its
    soft coverage summed over its bounding box grown by a pixel, so anti-aliased edges
    count for what they cover."""
    h, w = img.shape[:2]
    min_px = max(2, round(MIN_OBJECT_PIXELS * h * w / 64 ** 2))
    best, alpha = coverage(img)
    found: Dict[str, List[Blob]] = {}
    for i, name in enumerate(_NAMES):
        mine = best == i
        mask = mine & (alpha >= 0.5)
        if mask.sum() < min_px:
            continue
        soft = np.where(mine, alpha, 0.0)
        blobs = []
        for pts in components(mask):
            if len(pts) < min_px:
                continue
            ys, xs = pts[:, 0], pts[:, 1]
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            area = float(soft[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1].sum())
            own = np.zeros((y1 - y0, x1 - x0))
            own[ys - y0, xs - x0] = soft[ys, xs]
            fill, top, corner = _shape_features(own)
            blobs.append(Blob(name, area, (x0, y0, x1, y1), (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
                              area / max(1, (x1 - x0) * (y1 - y0)), top, corner))
        if blobs:
            found[name] = blobs
    return found


def _in_region(pos: str, cx: float, cy: float, m: float) -> bool:
    if pos == "left":
        return cx < 0.5 - m
    if pos == "right":
        return cx > 0.5 + m
    if pos == "above":
        return cy < 0.5 - m
    if pos == "below":
        return cy > 0.5 + m
    if pos == "center":
        return abs(cx - 0.5) < 0.25 - m and abs(cy - 0.5) < 0.25 - m
    raise ValueError(f"position: unknown {pos!r}")


def _in_relation(rel: str, a: Tuple[float, float], b: Tuple[float, float], m: float) -> bool:
    (ax, ay), (bx, by) = a, b
    return {"left": ax < bx - m, "right": ax > bx + m, "above": ay < by - m, "below": ay > by + m}[rel]


def _centroid(blobs: List[Blob], w: int, h: int) -> Optional[Tuple[float, float]]:
    if not blobs:
        return None
    area = sum(b.area for b in blobs)
    return (sum(b.centroid[0] * b.area for b in blobs) / area / w,
            sum(b.centroid[1] * b.area for b in blobs) / area / h)


def check_image(img, scene: dict) -> Check:
    """Score one image against a scene: ``scene`` as ``parse_caption`` returns it
    ({'objects': [{'count', 'colour', 'shape'}...], 'relation' or 'position'})."""
    img = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"img: expected an RGB image, got shape {img.shape}")
    h, w = img.shape[:2]
    found = find_blobs(img)
    groups = scene["objects"]
    relation = scene.get("relation")
    # the blobs of each group: its colour's; when both groups share a colour (their
    # shapes then differ), each takes the blobs of its shape
    shared = len(groups) == 2 and groups[0]["colour"] == groups[1]["colour"]
    per_group: List[List[Blob]] = []
    for g in groups:
        blobs = found.get(g["colour"], [])
        per_group.append([b for b in blobs if b.shape == g["shape"]] if shared else blobs)

    named = {g["colour"] for g in groups}
    named_px = sum(b.area for c in named for b in found.get(c, []))
    other_px = sum(b.area for c, bl in found.items() if c not in named for b in bl)
    colour_ok = all(per_group) and other_px <= 0.25 * named_px
    count_ok = all(len(bl) == g["count"] for bl, g in zip(per_group, groups))
    if shared:
        blobs = found.get(groups[0]["colour"], [])
        shape_ok = all(per_group) and sum(b.shape in (groups[0]["shape"], groups[1]["shape"])
                                          for b in blobs) * 2 > len(blobs)
    else:
        shape_ok = all(bl and sum(b.shape == g["shape"] for b in bl) * 2 > len(bl)
                       for bl, g in zip(per_group, groups))
    cents = [_centroid(bl, w, h) for bl in per_group]
    if any(c is None for c in cents):
        position_ok = False
    elif relation:
        position_ok = _in_relation(relation, cents[0], cents[1], POSITION_MARGIN)
    else:
        position_ok = _in_region(scene["position"], *cents[0], POSITION_MARGIN)
    return Check(colour_ok, count_ok, shape_ok, position_ok, found)
