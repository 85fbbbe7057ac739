"""A rating study: the questions asked, their batches, and the control questions.

Built from a samples manifest (``eval drawbench`` output, ``eval fid --samples-dir``).
Three tasks, as in the paper's human evaluation (Saharia et al. 2022, section 4.3 and
appendix E):

* ``photorealism``: two images, "Which image is more photorealistic?", A / B / indifferent.
* ``caption_ab``: the caption and two images, "Which image matches the caption better?",
  A / B / indifferent.
* ``alignment``: one image and its caption, "Does the caption accurately describe the
  image?", yes / somewhat / no, scored 100 / 50 / 0.

A/B questions compare two systems of the manifest (``compare``; e.g. a model and the
COCO reference images, or two checkpoints), on each item's first image of each.
Alignment questions go to each system in ``align``. The real questions are shuffled
(seeded) and cut into batches of ``batch_size`` (50 in the paper); a rater gets one
batch.

Control questions have a known answer and are interleaved with the real ones, one
at a random place in each run of ``control_every`` real questions (1 in 6 trials by
default), to tell attentive raters from careless ones:

* photorealism: an image next to a visibly destroyed copy of itself (tiles shuffled,
  strong noise); the intact image is right.
* caption_ab: an item's caption with its own image and another item's image (same
  system); the item's own image is right.
* alignment: an image shown with another item's caption; "no" is right.

Raters are kept when they answer at least ``min_control_accuracy`` (80%) of the control
trials they answered correctly (``report.py``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from ..images import load_rgb
from ..manifest import REFERENCE, Manifest

TASKS = ("photorealism", "caption_ab", "alignment")
QUESTIONS = {
    "photorealism": "Which image is more photorealistic (looks more real)?",
    "caption_ab": "Which image matches the caption better?",
    "alignment": "Does the caption accurately describe the image?",
}
ALIGNMENT_SCORES = {"yes": 100, "somewhat": 50, "no": 0}


@dataclass
class StudyConfig:
    tasks: List[str] = field(default_factory=lambda: list(TASKS))
    compare: Optional[List[str]] = None      # two system labels; default: the first two
    align: Optional[List[str]] = None        # systems rated alone; default: compare
    batch_size: int = 50
    control_every: int = 5
    min_control_accuracy: float = 0.8
    seed: int = 0

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"tasks: expected some of {list(TASKS)}, got {self.tasks}")
        if self.compare is not None and (len(self.compare) != 2 or self.compare[0] == self.compare[1]):
            raise ValueError(f"compare: expected two different system labels, got {self.compare}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {self.batch_size!r}")
        if not isinstance(self.control_every, int) or self.control_every < 1:
            raise ValueError(f"control_every: expected a positive int, got {self.control_every!r}")
        if not 0.0 <= self.min_control_accuracy <= 1.0:
            raise ValueError(f"min_control_accuracy: expected a fraction in [0, 1], got "
                             f"{self.min_control_accuracy}")


@dataclass
class Question:
    kind: str
    caption: str
    image_a: str
    image_b: Optional[str]      # None for alignment questions
    system_a: str
    system_b: Optional[str]
    item: str
    batch: int
    control: bool = False
    expected: Optional[str] = None   # a control's right answer: "a", "b" or "no"


@dataclass
class Study:
    config: StudyConfig
    source: str
    questions: List[Question]

    @property
    def num_batches(self) -> int:
        return 1 + max((q.batch for q in self.questions), default=-1)

    def digest(self) -> str:
        blob = json.dumps({"config": asdict(self.config),
                           "questions": [asdict(q) for q in self.questions]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def degrade(image: Image.Image, seed: int, tiles: int = 4, noise: float = 40.0) -> Image.Image:
    """A copy nobody would call photorealistic: a tiles x tiles grid shuffled, plus noise."""
    rng = np.random.default_rng(seed)
    a = np.asarray(image.convert("RGB")).astype(np.float32)
    h, w = (a.shape[0] // tiles) * tiles, (a.shape[1] // tiles) * tiles
    a = a[:h, :w]
    th, tw = h // tiles, w // tiles
    blocks = [a[i * th:(i + 1) * th, j * tw:(j + 1) * tw] for i in range(tiles) for j in range(tiles)]
    order = rng.permutation(len(blocks))
    if len(blocks) > 1 and np.all(order == np.arange(len(blocks))):
        order = np.roll(order, 1)
    rows = [np.concatenate([blocks[k] for k in order[r * tiles:(r + 1) * tiles]], axis=1)
            for r in range(tiles)]
    out = np.concatenate(rows, axis=0) + rng.normal(0.0, noise, size=(h, w, 3))
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _first_image(manifest: Manifest, item: dict, label: str) -> Optional[str]:
    imgs = item["images"].get(label) or []
    return manifest.image_path(imgs[0]) if imgs else None


def build_study(manifest: Manifest, config: StudyConfig, control_dir: str) -> Study:
    """Questions for ``manifest`` under ``config``; the degraded control images are
    written to ``control_dir``."""
    labels = manifest.labels
    compare = config.compare or labels[:2]
    ab_tasks = [t for t in config.tasks if t != "alignment"]
    if ab_tasks and len(compare) < 2:
        raise ValueError(f"tasks {ab_tasks} compare two systems; {manifest.folder} has "
                         f"only {labels}")
    align = config.align or (compare if len(compare) == 2 else labels)
    for lb in list(compare) + list(align):
        if lb not in labels:
            raise ValueError(f"system {lb!r} is not in {manifest.folder} (systems: {', '.join(labels)})")
    items = [it for it in manifest.items if str(it.get("caption", "")).strip()]
    if not items:
        raise ValueError(f"{manifest.folder}: no items with captions to rate")
    if len({it["caption"] for it in items}) < 2:
        raise ValueError(f"{manifest.folder}: control questions need at least two different captions")
    for it in items:
        for lb in set(compare if ab_tasks else []) | set(align if "alignment" in config.tasks else []):
            p = _first_image(manifest, it, lb)
            if p is None or not os.path.isfile(p):
                raise FileNotFoundError(f"item {it['id']}: image of system {lb!r} missing "
                                        f"({p or 'not listed'})")
    rng = random.Random(config.seed)
    real: List[Question] = []
    for it in items:
        cap = it["caption"]
        for task in ab_tasks:
            a, b = _first_image(manifest, it, compare[0]), _first_image(manifest, it, compare[1])
            real.append(Question(task, cap, a, b, compare[0], compare[1], str(it["id"]), -1))
        if "alignment" in config.tasks:
            for lb in align:
                real.append(Question("alignment", cap, _first_image(manifest, it, lb), None, lb,
                                     None, str(it["id"]), -1))
    rng.shuffle(real)
    questions: List[Question] = []
    num_batches = math.ceil(len(real) / config.batch_size)
    os.makedirs(control_dir, exist_ok=True)
    # controls prefer the reference images (real photos) where the manifest has them
    control_system = REFERENCE if REFERENCE in labels else compare[0]
    control_items = [it for it in items if _first_image(manifest, it, control_system)]
    for b in range(num_batches):
        batch = real[b * config.batch_size:(b + 1) * config.batch_size]
        for q in batch:
            q.batch = b
        questions.extend(batch)
        kinds = [q.kind for q in batch]
        for k in range(math.ceil(len(batch) / config.control_every)):
            kind = kinds[k % len(kinds)]
            questions.append(_control(kind, manifest, control_items, control_system, rng,
                                      control_dir, b, k))
    return Study(config, manifest.folder, questions)


def _control(kind: str, manifest: Manifest, items: Sequence[dict], system: str,
             rng: random.Random, control_dir: str, batch: int, k: int) -> Question:
    it = rng.choice(items)
    other = rng.choice([x for x in items if x["caption"] != it["caption"]])
    own = _first_image(manifest, it, system)
    if kind == "photorealism":
        seed = int(hashlib.sha256(f"{own}|{batch}|{k}".encode()).hexdigest()[:8], 16)
        path = os.path.join(control_dir, f"control-{batch}-{k}-{seed:08x}.png")
        if not os.path.isfile(path):
            degrade(load_rgb(own), seed).save(path)
        intact_first = rng.random() < 0.5
        a, b = (own, path) if intact_first else (path, own)
        return Question(kind, it["caption"], a, b, system, "control", str(it["id"]), batch,
                        control=True, expected="a" if intact_first else "b")
    if kind == "caption_ab":
        wrong = _first_image(manifest, other, system)
        own_first = rng.random() < 0.5
        a, b = (own, wrong) if own_first else (wrong, own)
        return Question(kind, it["caption"], a, b, system, system, str(it["id"]), batch,
                        control=True, expected="a" if own_first else "b")
    return Question("alignment", other["caption"], own, None, system, None, str(it["id"]), batch,
                    control=True, expected="no")
