"""CLIP score: how well images match their captions, by a CLIP model from a local folder.

Per pair: ``100 * max(cos(image_embedding, text_embedding), 0)`` with the model's
projected embeddings; a set's score is the mean over its pairs (the usual definition,
as in the papers that report it next to FID). The folder is what
``CLIPModel.save_pretrained`` and ``CLIPProcessor.save_pretrained`` write (config,
weights, tokenizer and image-processor files); it is opened with
``local_files_only=True``: nothing is ever downloaded. Captions longer than the text
encoder's context (77 tokens for OpenAI's models) are truncated.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .images import ImageLike, load_rgb


def _check_clip_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"CLIP model directory not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"CLIP model directory {path} has no config.json")
    if not any(os.path.isfile(os.path.join(path, n))
               for n in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        raise FileNotFoundError(f"CLIP model directory {path} has no weights file "
                                f"(model.safetensors or pytorch_model.bin)")


class CLIPScorer:
    def __init__(self, path: str, *, device=None, dtype=None, batch_size: int = 32):
        _check_clip_dir(path)
        from transformers import CLIPModel, CLIPProcessor
        self.device = torch.device(device or "cpu")
        self.model = CLIPModel.from_pretrained(path, local_files_only=True,
                                               dtype=dtype or torch.float32).to(self.device).eval()
        self.model.requires_grad_(False)
        try:
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise FileNotFoundError(f"CLIP model directory {path} lacks a usable tokenizer or "
                                    f"image processor ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''})") from None
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.batch_size = batch_size
        self.identity = f"clip:{os.path.abspath(path)}"

    @torch.no_grad()
    def _embed(self, images: Sequence[ImageLike], captions: Sequence[str]):
        inputs = self.processor(text=list(captions), images=[_pil(im) for im in images],
                                return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_length)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        dtype = next(self.model.parameters()).dtype
        pix = inputs["pixel_values"].to(dtype)
        img = self.model.get_image_features(pixel_values=pix)
        txt = self.model.get_text_features(input_ids=inputs["input_ids"],
                                           attention_mask=inputs.get("attention_mask"))
        img, txt = _as_tensor(img), _as_tensor(txt)
        return (torch.nn.functional.normalize(img.float(), dim=-1),
                torch.nn.functional.normalize(txt.float(), dim=-1))

    def score(self, images: Sequence[ImageLike], captions: Sequence[str]) -> np.ndarray:
        """Per-pair scores 100 * max(cos, 0), shape (N,)."""
        images, captions = list(images), list(captions)
        if len(images) != len(captions):
            raise ValueError(f"images and captions differ in length: {len(images)} vs "
                             f"{len(captions)}")
        out = []
        for i in range(0, len(images), self.batch_size):
            img, txt = self._embed(images[i:i + self.batch_size], captions[i:i + self.batch_size])
            out.append((100.0 * (img * txt).sum(-1).clamp(min=0)).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def mean_score(self, images, captions) -> float:
        s = self.score(images, captions)
        if s.size == 0:
            raise ValueError("no image-caption pairs to score")
        return float(s.mean())


def _as_tensor(x):
    # transformers may return a model-output object instead of the bare projected tensor
    if isinstance(x, torch.Tensor):
        return x
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(x, name, None) is not None:
            return getattr(x, name)
    raise TypeError(f"unexpected CLIP feature output {type(x).__name__}")


def _pil(image: ImageLike):
    from PIL import Image
    return image if isinstance(image, Image.Image) else Image.fromarray(image)


def score_manifest(scorer: CLIPScorer, manifest, labels: Optional[List[str]] = None,
                   by_category: bool = True) -> Dict[str, dict]:
    """CLIP score of every system of a samples manifest (DrawBench output, FID samples):
    {label: {"clip_score", "num", "categories": {name: score}}}."""
    out = {}
    for label in labels or manifest.labels:
        if label not in manifest.labels:
            raise ValueError(f"system {label!r} is not in {manifest.folder} (systems: "
                             f"{', '.join(manifest.labels)})")
        caps, paths, cats = [], [], []
        for item in manifest.items:
            for rel in item["images"].get(label, []):
                caps.append(item["caption"])
                paths.append(manifest.image_path(rel))
                cats.append(item.get("category"))
        if not paths:
            raise ValueError(f"system {label!r} has no images in {manifest.folder}")
        scores = []
        for i in range(0, len(paths), 256):
            scores.extend(scorer.score([load_rgb(p) for p in paths[i:i + 256]],
                                       caps[i:i + 256]).tolist())
        scores = np.asarray(scores)
        entry = {"clip_score": float(scores.mean()), "num": int(scores.size)}
        if by_category and any(c for c in cats):
            entry["categories"] = {c: float(scores[[x == c for x in cats]].mean())
                                   for c in dict.fromkeys(cats) if c}
        out[label] = entry
    return out
