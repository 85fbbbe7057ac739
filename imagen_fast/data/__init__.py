"""Datasets for training: tar shards (img2dataset layout), image folders, synthetic shapes.

    from imagen_fast.data import StreamDataset, make_loader, transform_for_stage
    ds = StreamDataset("shards/", transform_for_stage(64))            # base stage
    ds = StreamDataset("shards/", transform_for_stage(256, 64))       # 64 -> 256 stage
    for batch in make_loader(ds, batch_size=32, num_workers=2):
        batch["image"], batch["caption"], batch.get("lowres")
    print(ds.skips.summary())      # bad samples skipped and counted

``open_dataset(spec)`` accepts a directory of shards, a shard pattern, a directory of
images with .txt captions, or ``"shapes:N[:SEED[:SPLIT]]"`` (generated on the fly; SPLIT
is all, train or heldout). Pillow is required.
"""
from __future__ import annotations

from .shapes import (ShapesSource, caption_for, combination, combination_space, is_held_out,
                     make_scene, parse_caption, render, write_shapes)
from .skips import REASONS, SkipCounter, SkipSample
from .sources import ImageFolder, Record, TarShards, expand_shards, open_source
from .stream import StreamDataset, StreamPosition, collate, make_loader
from .transforms import ImageTransform, open_image, to_pil, to_tensor, transform_for_stage


def open_dataset(spec, transform=None, **kw) -> StreamDataset:
    """A StreamDataset from a spec string (see module docstring) or a source object.
    ``"shapes:N[:SEED[:SPLIT]]"`` generates N shapes images at the transform's size."""
    if isinstance(spec, str) and spec.startswith("shapes:"):
        parts = spec.split(":")
        try:
            if len(parts) > 4:
                raise ValueError
            num = int(parts[1])
            seed = int(parts[2]) if len(parts) > 2 else 0
        except (IndexError, ValueError):
            raise ValueError(f"spec: expected 'shapes:N', 'shapes:N:SEED' or 'shapes:N:SEED:SPLIT', "
                             f"got {spec!r}") from None
        split = parts[3] if len(parts) > 3 else "all"
        res = transform.resize or transform.size if transform is not None else 64
        spec = ShapesSource(num, seed, res, split)
    return StreamDataset(spec, transform, **kw)


__all__ = ["StreamDataset", "StreamPosition", "collate", "make_loader", "open_dataset",
           "ImageTransform", "transform_for_stage", "open_image", "to_tensor", "to_pil",
           "TarShards", "ImageFolder", "ShapesSource", "Record", "expand_shards", "open_source",
           "SkipCounter", "SkipSample", "REASONS",
           "write_shapes", "make_scene", "render", "caption_for", "parse_caption", "combination",
           "combination_space", "is_held_out"]
