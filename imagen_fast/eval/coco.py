"""A COCO-format caption set: ``captions_*.json`` (``images``: id + file_name,
``annotations``: image_id + caption) and the folder of images it names.

Layout looked for under a directory DIR (MS-COCO's own): ``DIR/annotations/captions_<split>.json``
with images in ``DIR/<split>/``; also ``DIR/captions*.json``, and images in
``DIR/images/`` or DIR itself. ``captions=`` and ``images=`` override either part.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np


@dataclass
class CocoCaptions:
    captions_file: str
    image_dir: str
    annotations: List[Tuple[int, str]]     # (image_id, caption), file order
    images: Dict[int, str]                 # image_id -> absolute path

    def image_paths(self) -> List[str]:
        return sorted(self.images.values())

    def sample(self, num: int, seed: int = 0) -> List[Tuple[int, str]]:
        """``num`` distinct annotations drawn uniformly at random (numpy's PCG64 seeded
        with ``seed``): the FID-30K protocol's prompts."""
        if not isinstance(num, int) or num < 1:
            raise ValueError(f"num: expected a positive int, got {num!r}")
        if num > len(self.annotations):
            raise ValueError(f"num: {num} captions asked for, {self.captions_file} has "
                             f"{len(self.annotations)}")
        idx = np.random.default_rng(seed).choice(len(self.annotations), size=num, replace=False)
        return [self.annotations[i] for i in sorted(idx.tolist())]


def _find_captions(root: str) -> str:
    found = sorted(glob.glob(os.path.join(root, "annotations", "captions*.json"))) or \
        sorted(glob.glob(os.path.join(root, "captions*.json")))
    if not found:
        raise FileNotFoundError(f"COCO directory {root} has no captions file "
                                f"(annotations/captions_*.json)")
    if len(found) > 1:
        raise ValueError(f"COCO directory {root} has several captions files "
                         f"({', '.join(os.path.basename(f) for f in found)}): pick one with captions=")
    return found[0]


def _find_image_dir(root: str, captions_file: str, names: List[str]) -> str:
    stem = os.path.splitext(os.path.basename(captions_file))[0]
    split = stem[len("captions_"):] if stem.startswith("captions_") else None
    candidates = ([os.path.join(root, split)] if split else []) + \
        [os.path.join(root, "images"), root]
    probe = names[:50]
    for d in candidates:
        if os.path.isdir(d) and any(os.path.isfile(os.path.join(d, n)) for n in probe):
            return d
    raise FileNotFoundError(f"COCO directory {root}: none of the images named by "
                            f"{os.path.basename(captions_file)} (e.g. {names[0]}) is in "
                            f"{', '.join(candidates)}")


def load_coco(root: Optional[str] = None, *, captions: Optional[str] = None,
              images: Optional[str] = None) -> CocoCaptions:
    if root is None and (captions is None or images is None):
        raise ValueError("coco: give the COCO directory, or both captions= and images=")
    if root is not None and not os.path.isdir(root):
        raise FileNotFoundError(f"COCO directory not found: {root}")
    captions_file = captions or _find_captions(root)
    if not os.path.isfile(captions_file):
        raise FileNotFoundError(f"captions file not found: {captions_file}")
    try:
        with open(captions_file) as f:
            data = json.load(f)
        entries = data["images"]
        anns = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{captions_file} is not a COCO captions file "
                         f"(needs 'images' and 'annotations'): {e}") from None
    names = {int(e["id"]): e["file_name"] for e in entries}
    if not names:
        raise ValueError(f"{captions_file} lists no images")
    annotations = [(int(a["image_id"]), str(a["caption"]).strip()) for a in anns
                   if str(a.get("caption", "")).strip()]
    if not annotations:
        raise ValueError(f"{captions_file} has no captions")
    orphans = {i for i, _ in annotations if i not in names}
    if orphans:
        raise ValueError(f"{captions_file}: {len(orphans)} caption(s) refer to image ids not "
                         f"in its 'images' list (e.g. {sorted(orphans)[:3]})")
    image_dir = images or _find_image_dir(root, captions_file, list(names.values()))
    paths = {i: os.path.abspath(os.path.join(image_dir, n)) for i, n in names.items()}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) named by {captions_file} are missing "
                                f"from {image_dir} (e.g. {missing[0]})")
    return CocoCaptions(os.path.abspath(captions_file), os.path.abspath(image_dir),
                        annotations, paths)
