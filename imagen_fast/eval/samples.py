"""Generating images for a list of prompts in fixed, seeded batches, optionally kept on
disk so that a long run (FID-30K, DrawBench) resumes where it stopped.

Batch c of ``batch_size`` prompts is always sampled with seed ``seed + c``: the same
prompts, seed and batch size give the same images, and two systems run on one prompt
list see the same seeds side by side. ``SampleDir`` holds one run's images as
``<folder>/<name>.png`` next to ``run.json`` (system, seed, batch size, prompts); a
folder holding another run is refused rather than mixed.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from PIL import Image

from .generator import System
from .images import load_rgb, square_resize

RUN_FILE = "run.json"


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


class SampleDir:
    def __init__(self, folder: str, names: Sequence[str], run: dict, *, overwrite: bool = False):
        self.folder, self.names = folder, list(names)
        os.makedirs(folder, exist_ok=True)
        run = {**run, "names": self.names}
        path = os.path.join(folder, RUN_FILE)
        if os.path.isfile(path) and not overwrite:
            with open(path) as f:
                old = json.load(f)
            if old != json.loads(json.dumps(run)):
                changed = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
                raise FileExistsError(f"{folder} holds samples of another run (differs in "
                                      f"{', '.join(changed)}): choose another output or overwrite")
        elif overwrite:
            for i in range(len(self.names)):
                if self.has(i):
                    os.remove(self.path_of(i))
        _write_json(path, run)

    def path_of(self, i: int) -> str:
        return os.path.join(self.folder, self.names[i] + ".png")

    def has(self, i: int) -> bool:
        return os.path.isfile(self.path_of(i))

    def load(self, i: int) -> Image.Image:
        return load_rgb(self.path_of(i))

    def save(self, i: int, image: Image.Image) -> None:
        p = self.path_of(i)
        tmp = p + ".tmp.png"
        image.save(tmp)
        os.replace(tmp, p)  # a crash never leaves a half-written image behind


def generate(system: System, prompts: Sequence[str], *, seed: int = 0, batch_size: int = 8,
             size: Optional[int] = None, sample_dir: Optional[SampleDir] = None,
             progress: Optional[Callable[[int], None]] = None
             ) -> Iterator[Tuple[List[int], List[Image.Image]]]:
    """Yields (indices, images) batch by batch; images square-resized to ``size`` when
    given. Batches already in ``sample_dir`` are read back instead of sampled."""
    prompts = list(prompts)
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
    if sample_dir is not None and len(sample_dir.names) != len(prompts):
        raise ValueError(f"sample_dir has {len(sample_dir.names)} names for {len(prompts)} prompts")
    for c, start in enumerate(range(0, len(prompts), batch_size)):
        idx = list(range(start, min(len(prompts), start + batch_size)))
        if sample_dir is not None and all(sample_dir.has(i) for i in idx):
            images = [sample_dir.load(i) for i in idx]
        else:
            images = system.generate([prompts[i] for i in idx], seed=seed + c)
            if size:
                images = [square_resize(im, size) for im in images]
            if sample_dir is not None:
                for i, im in zip(idx, images, strict=True):
                    sample_dir.save(i, im)
        if progress:
            progress(len(idx))
        yield idx, images


def tqdm_progress(total: int, desc: str, enabled: bool = True):
    """A ``progress(n)`` callback over tqdm on stderr (None when disabled)."""
    if not enabled:
        return None
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="img", leave=False)

    def update(n: int):
        bar.update(n)
        if bar.n >= bar.total:
            bar.close()
    return update
