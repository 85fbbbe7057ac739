"""A synthetic "shapes" dataset: training can be tried with no download.

Each image shows one group, or two groups, of identical coloured shapes (circle, square,
triangle; 1-4 of each) on a plain background, with a caption that says what and where:

    "three green triangles on the left"
    "two red circles above a blue square"
    "a yellow square to the right of four purple circles, on a gray background"

Positions are regions of the image: ``left`` / ``right`` (halves), ``above`` / ``below``
(top / bottom halves) and ``center``. A two-group scene places the groups in opposite
halves and names their relation ("above", "below", "to the left of", "to the right of").
Every image has a ground-truth record (the sample's .json): background, relation and, per
group, shape, colour, count, position, the group's bbox and each instance's bbox, in pixels
as [x0, y0, x1, y1) of the written image.

Scenes are a pure function of (seed, index), so generation is reproducible and
``write_shapes`` output is byte-identical for the same arguments. ``ShapesSource`` makes the
same scenes on the fly (no files) for ``StreamDataset``.

Held-out combinations: a scene's *combination* is its caption without the background
clause ("two red circles above a blue square"). One combination in ``HOLDOUT_MODULUS`` (by
a fixed CRC-32 of its text) is held out. ``split="train"`` draws only the others,
``split="heldout"`` only those, ``split="all"`` (the default) every scene; a split scene is
the first draw of the index's (seed, index, attempt) sequence that falls in the split, so
splits are reproducible too. ``combination_space(split)`` lists every combination, for
evaluation prompts that training never saw.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

from PIL import Image, ImageDraw

from .sources import Record

SHAPES = ("circle", "square", "triangle")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 38, 38), "green": (34, 160, 70), "blue": (37, 80, 225),
    "yellow": (245, 205, 30), "purple": (140, 60, 185), "orange": (245, 130, 25),
}
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "white": (248, 248, 248), "black": (16, 16, 16), "gray": (128, 128, 128), "beige": (232, 220, 190),
}
_LOW_CONTRAST = {("yellow", "beige"), ("yellow", "white"), ("orange", "beige")}
POSITIONS = ("left", "right", "above", "below", "center")
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
_WHERE = {"left": "on the left", "right": "on the right", "above": "at the top",
          "below": "at the bottom", "center": "in the center"}
_RELATION = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# regions as fractions of the image: (x0, y0, x1, y1)
_M = 0.02
_REGION = {"left": (_M, _M, 0.5, 1 - _M), "right": (0.5, _M, 1 - _M, 1 - _M),
           "above": (_M, _M, 1 - _M, 0.5), "below": (_M, 0.5, 1 - _M, 1 - _M),
           "center": (0.26, 0.26, 0.74, 0.74)}
_CELL = 0.24
SPLITS = ("all", "train", "heldout")
HOLDOUT_MODULUS = 16


def _phrase(g: dict) -> str:
    noun = g["shape"] + ("s" if g["count"] > 1 else "")
    word = COUNT_WORDS[g["count"]]
    if word == "a" and g["colour"][0] in "aeiou":
        word = "an"
    return f"{word} {g['colour']} {noun}"


def caption_for(record: dict) -> str:
    """The caption of a scene record (see the module docstring for the grammar)."""
    objs = record["objects"]
    if record.get("relation"):
        text = f"{_phrase(objs[0])} {_RELATION[record['relation']]} {_phrase(objs[1])}"
    else:
        text = f"{_phrase(objs[0])} {_WHERE[objs[0]['position']]}"
    if record.get("background_in_caption"):
        text += f", on a {record['background']} background"
    return text


def combination(record: dict) -> str:
    """The scene's caption without the background clause: what the held-out split keys on."""
    return caption_for({**record, "background_in_caption": False})


def is_held_out(record_or_combination) -> bool:
    """Whether a scene (record) or combination (string) belongs to the held-out split."""
    text = record_or_combination if isinstance(record_or_combination, str) else combination(record_or_combination)
    return zlib.crc32(text.encode("utf-8")) % HOLDOUT_MODULUS == 0


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    return split


def combination_space(split: str = "all") -> List[dict]:
    """Every combination the grammar can express, as scene-like records without instances:
    {'caption', 'relation', 'objects': [{'shape', 'colour', 'count', 'position'}...]},
    filtered by ``split``. Colours are those legal on at least one background."""
    _check_split(split)
    kinds = [(s, c) for s in SHAPES for c in sorted(COLOURS)]
    out = []
    for pos in POSITIONS:
        for shape, colour in kinds:
            for n in COUNT_WORDS:
                out.append({"relation": None, "objects": [
                    {"shape": shape, "colour": colour, "count": n, "position": pos}]})
    for rel in sorted(_RELATION):
        for a in kinds:
            for b in kinds:
                if a == b:
                    continue
                for na in COUNT_WORDS:
                    for nb in COUNT_WORDS:
                        out.append({"relation": rel, "objects": [
                            {"shape": a[0], "colour": a[1], "count": na, "position": rel},
                            {"shape": b[0], "colour": b[1], "count": nb, "position": _OPPOSITE[rel]}]})
    for rec in out:
        rec["caption"] = combination(rec)
    if split == "all":
        return out
    return [r for r in out if is_held_out(r["caption"]) == (split == "heldout")]


def _place(rng: random.Random, position: str, count: int) -> List[Tuple[float, float, float, float]]:
    """``count`` non-overlapping boxes (fractions) in the region: one per distinct grid cell."""
    x0, y0, x1, y1 = _REGION[position]
    nx, ny = int((x1 - x0 + 1e-9) // _CELL), int((y1 - y0 + 1e-9) // _CELL)
    # centre the grid in the region
    ox, oy = x0 + ((x1 - x0) - nx * _CELL) / 2, y0 + ((y1 - y0) - ny * _CELL) / 2
    cells = rng.sample([(i, j) for j in range(ny) for i in range(nx)], count)
    boxes = []
    for i, j in sorted(cells, key=lambda c: (c[1], c[0])):
        s = _CELL * rng.uniform(0.6, 0.85)
        cx0 = ox + i * _CELL + rng.uniform(0, _CELL - s)
        cy0 = oy + j * _CELL + rng.uniform(0, _CELL - s)
        boxes.append((cx0, cy0, cx0 + s, cy0 + s))
    return boxes


def make_scene(seed: int, index: int, split: str = "all") -> dict:
    """The scene record for image ``index`` of dataset ``seed`` (boxes as fractions),
    drawn from ``split`` (see the module docstring)."""
    if _check_split(split) == "all":
        return _draw_scene(random.Random(f"imagen-fast-shapes/{seed}/{index}"), index)
    for attempt in range(1, 100 * HOLDOUT_MODULUS):
        rec = _draw_scene(random.Random(f"imagen-fast-shapes/{seed}/{index}/{attempt}"), index)
        if is_held_out(rec) == (split == "heldout"):
            return rec
    raise RuntimeError(f"no {split} scene found for index {index}")  # pragma: no cover


def _draw_scene(rng: random.Random, index: int) -> dict:
    background = rng.choice(sorted(BACKGROUNDS))
    ok_colours = [c for c in sorted(COLOURS) if (c, background) not in _LOW_CONTRAST]
    two = rng.random() < 0.5
    groups = []
    if two:
        pos = rng.choice(sorted(_RELATION))
        positions = [pos, _OPPOSITE[pos]]
        first = (rng.choice(SHAPES), rng.choice(ok_colours))
        second = rng.choice([(s, c) for s in SHAPES for c in ok_colours if (s, c) != first])
        kinds = [first, second]
    else:
        positions = [rng.choice(POSITIONS)]
        kinds = [(rng.choice(SHAPES), rng.choice(ok_colours))]
    for (shape, colour), position in zip(kinds, positions):
        count = rng.randint(1, 4)
        groups.append({"shape": shape, "colour": colour, "count": count, "position": position,
                       "instances": _place(rng, position, count)})
    rec = {"index": index, "background": background, "relation": positions[0] if two else None,
           "background_in_caption": rng.random() < 0.5, "objects": groups}
    rec["caption"] = caption_for(rec)
    return rec


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)


def render(scene: dict, resolution: int = 64, supersample: int = 4) -> Tuple[Image.Image, dict]:
    """Draw a scene; returns the image and its record with pixel boxes."""
    big = resolution * supersample
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene["background"]])
    d = ImageDraw.Draw(img)
    objects = []
    for g in scene["objects"]:
        boxes = []
        for fx0, fy0, fx1, fy1 in g["instances"]:
            _draw_shape(d, g["shape"], (fx0 * big, fy0 * big, fx1 * big - 1, fy1 * big - 1), COLOURS[g["colour"]])
            boxes.append([int(fx0 * resolution), int(fy0 * resolution),
                          min(resolution, int(fx1 * resolution + 0.999)),
                          min(resolution, int(fy1 * resolution + 0.999))])
        bbox = [min(b[0] for b in boxes), min(b[1] for b in boxes),
                max(b[2] for b in boxes), max(b[3] for b in boxes)]
        objects.append({"shape": g["shape"], "colour": g["colour"], "count": g["count"],
                        "position": g["position"], "bbox": bbox, "instances": boxes})
    if supersample > 1:
        img = img.resize((resolution, resolution), Image.LANCZOS)
    record = {"caption": scene["caption"], "width": resolution, "height": resolution,
              "background": scene["background"], "relation": scene["relation"], "objects": objects}
    return img, record


def shape_sample(seed: int, index: int, resolution: int = 64, split: str = "all"
                 ) -> Tuple[Image.Image, dict]:
    return render(make_scene(seed, index, split), resolution)


def _encode(img: Image.Image, fmt: str) -> bytes:
    b = io.BytesIO()
    if fmt == "png":
        img.save(b, format="PNG", optimize=False, compress_level=6)
    else:
        img.save(b, format="JPEG", quality=95)
    return b.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    tf.addfile(ti, io.BytesIO(data))


def write_shapes(out_dir: Union[str, os.PathLike], num: int, seed: int = 0, resolution: int = 64, *,
                 shard_size: int = 1000, image_format: str = "png", overwrite: bool = False,
                 split: str = "all", progress=None) -> dict:
    """Write ``num`` shapes images of ``split`` as tar shards ``out_dir/{00000..}.tar`` in the
    img2dataset layout (``000000012.png`` + ``.txt`` + ``.json``) plus ``out_dir/shapes.json``
    (the arguments and the shard list). Each shard is written to a temporary name and
    renamed, so an interrupted run leaves only whole shards. Returns the manifest."""
    _check_split(split)
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num: expected a positive int, got {num!r}")
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution: expected an int >= 8, got {resolution!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size: expected a positive int, got {shard_size!r}")
    fmt = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}.get(str(image_format).lower())
    if fmt is None:
        raise ValueError(f"image_format: expected 'png' or 'jpg', got {image_format!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"out_dir: {out} is not empty (pass overwrite=True to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, num, shard_size)):
        name = f"{s:05d}.tar"
        tmp = out / f".{name}.tmp"
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(start, min(num, start + shard_size)):
                img, rec = shape_sample(seed, i, resolution, split)
                key = f"{i:09d}"
                rec = {"key": key, **rec}
                _add(tf, f"{key}.{fmt}", _encode(img, fmt))
                _add(tf, f"{key}.txt", rec["caption"].encode("utf-8"))
                _add(tf, f"{key}.json", json.dumps(rec, sort_keys=True).encode("utf-8"))
        os.replace(tmp, out / name)
        shards.append(name)
        if progress is not None:
            progress(min(num, start + shard_size), num)
    manifest = {"dataset": "imagen-fast shapes", "num": num, "seed": seed, "resolution": resolution,
                "shard_size": shard_size, "image_format": fmt, "split": split, "shards": shards}
    (out / "shapes.json").write_text(json.dumps(manifest, indent=1))
    return manifest


class ShapesSource:
    """The same scenes generated on the fly, one item per image (for ``StreamDataset``)."""

    granularity = "item"

    def __init__(self, num: int, seed: int = 0, resolution: int = 64, split: str = "all"):
        if not isinstance(num, int) or num < 1:
            raise ValueError(f"num: expected a positive int, got {num!r}")
        self.num, self.seed, self.resolution = num, seed, resolution
        self.split = _check_split(split)

    def num_units(self) -> int:
        return self.num

    def describe(self) -> str:
        return (f"shapes (generated: {self.num} images, seed {self.seed}, {self.resolution} px, "
                f"split {self.split})")

    def records(self, unit: int, on_error=None) -> Iterator[Record]:
        img, rec = shape_sample(self.seed, unit, self.resolution, self.split)
        key = f"{unit:09d}"
        yield Record(key, {"png": img, "txt": rec["caption"], "json": {"key": key, **rec}}, "shapes")


def parse_caption(caption: str) -> Optional[dict]:
    """Inverse of ``caption_for`` on the grammar above (used by tests and evaluation):
    {'objects': [{'count', 'colour', 'shape'}...], 'relation' or 'position', 'background'}."""
    words = {v: k for k, v in COUNT_WORDS.items()}
    words["an"] = 1
    text, background = caption, None
    if ", on a " in text and text.endswith(" background"):
        text, bg = text.split(", on a ", 1)
        background = bg[: -len(" background")]

    def group(tokens):
        if len(tokens) != 3 or tokens[0] not in words or tokens[1] not in COLOURS:
            return None
        noun = tokens[2][:-1] if tokens[2].endswith("s") else tokens[2]
        if noun not in SHAPES or (words[tokens[0]] > 1) != tokens[2].endswith("s"):
            return None
        return {"count": words[tokens[0]], "colour": tokens[1], "shape": noun}

    for pos, rel in _RELATION.items():
        sep = f" {rel} "
        if sep in text:
            a, b = text.split(sep, 1)
            ga, gb = group(a.split()), group(b.split())
            if ga and gb:
                return {"objects": [ga, gb], "relation": pos, "background": background}
    for pos, where in _WHERE.items():
        if text.endswith(" " + where):
            g = group(text[: -len(where) - 1].split())
            if g:
                return {"objects": [g], "position": pos, "background": background}
    return None
