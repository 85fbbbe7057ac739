"""``manifest.json``: what an output folder of generated images holds, for the CLIP score
and the rating app to read back.

    {"format": "imagen-fast-samples", "version": 1,
     "systems": [{"label": "A", "spec": "...", "settings": {...}}, ...],
     "items": [{"id": "12", "caption": "...", "category": "Colors",
                "images": {"A": ["images/a/012_0.png", ...], "reference": ["/coco/x.jpg"]}}]}

Image paths are relative to the manifest's folder unless absolute. DrawBench writes one
(every system, N images per prompt); FID-30K writes one for its kept samples with the
COCO image of each caption as system "reference".
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List

FORMAT = "imagen-fast-samples"
VERSION = 1
NAME = "manifest.json"
REFERENCE = "reference"


@dataclass
class Manifest:
    folder: str
    systems: List[Dict[str, Any]]
    items: List[Dict[str, Any]]

    @property
    def labels(self) -> List[str]:
        return [s["label"] for s in self.systems]

    def image_path(self, rel: str) -> str:
        return rel if os.path.isabs(rel) else os.path.normpath(os.path.join(self.folder, rel))


def write_manifest(folder: str, systems: List[Dict[str, Any]], items: List[Dict[str, Any]]) -> str:
    path = os.path.join(folder, NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "systems": systems, "items": items},
                  f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder_or_file: str) -> Manifest:
    path = folder_or_file
    if os.path.isdir(path):
        path = os.path.join(path, NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {NAME} in {folder_or_file} (write one with `imagen-fast "
                                f"eval drawbench` or `eval fid --samples-dir`)")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} manifest (format={data.get('format')!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: manifest version {data.get('version')} is not supported")
    return Manifest(os.path.dirname(os.path.abspath(path)), data["systems"], data["items"])
