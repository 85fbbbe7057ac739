"""Small offline stand-ins for the evaluation tests: a random-weight cascade, a synthetic
COCO-format folder, random-weight Inception and CLIP models, deterministic generators."""
from __future__ import annotations

import json
import os
import zlib

import numpy as np
import torch
from PIL import Image

from imagen_fast.eval.manifest import REFERENCE, write_manifest

TEXT = {"encoder": "hash:32", "max_length": 32}


def tiny_cascade_dir(path, steps: int = 2, seed: int = 0, dtype=None) -> str:
    """tiny-base32 -> tiny-sr64 with random weights and the hash text encoder, saved
    (weights cast to ``dtype`` in the file when given)."""
    from imagen_fast.cascade import ImagenCascade
    torch.manual_seed(seed)
    c = ImagenCascade.from_presets(("tiny-base32", "tiny-sr64"), names=["base", "sr64"])
    c.text = dict(TEXT)
    for st in c.stages:
        st.sampling = st.sampling.replace(steps=steps)
    c.save(str(path), dtype=dtype)
    return str(path)


def random_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth random colours (a blurred noise field), not flat and not white noise."""
    small = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def write_coco(root, num_images: int = 8, captions_per_image: int = 2, seed: int = 0,
               split: str = "val2014") -> str:
    """A COCO-format folder: annotations/captions_<split>.json + <split>/*.jpg of mixed,
    non-square sizes."""
    rng = np.random.default_rng(seed)
    root = str(root)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    words = ["red", "blue", "dog", "cat", "car", "tree", "small", "large", "two", "on", "a", "table"]
    images, anns = [], []
    for i in range(num_images):
        name = f"COCO_{split}_{i:012d}.jpg"
        w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        random_image(rng, w, h).save(os.path.join(root, split, name), quality=95)
        images.append({"id": 1000 + i, "file_name": name, "width": w, "height": h})
        for k in range(captions_per_image):
            cap = " ".join(rng.choice(words, size=int(rng.integers(3, 7))).tolist())
            anns.append({"id": len(anns), "image_id": 1000 + i, "caption": f"{cap} {i}.{k}"})
    with open(os.path.join(root, "annotations", f"captions_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    return root


def random_inception(seed: int = 0):
    """The FID InceptionV3 with random weights that keep activations at a sane scale."""
    from imagen_fast.eval.inception import InceptionV3
    torch.manual_seed(seed)
    m = InceptionV3()
    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
        elif isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.8, 1.2)
            mod.weight.data.uniform_(0.8, 1.2)
            mod.bias.data.normal_(0, 0.1)
    return m.eval()


def random_inception_file(path, seed: int = 0) -> str:
    torch.save(random_inception(seed).state_dict(), str(path))
    return str(path)


class SmallFeatureNet(torch.nn.Module):
    """A cheap random feature extractor with the Inception interface
    ((N, 3, 299, 299) in [0, 255] -> (N, D))."""

    def __init__(self, dim: int = 12, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, dim, 5, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.1)
            self.conv.bias.zero_()

    def forward(self, x):
        x = torch.nn.functional.avg_pool2d((x - 128.0) / 128.0, 4)
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def small_extractor(seed: int = 0):
    from imagen_fast.eval.fid import FeatureExtractor
    return FeatureExtractor(SmallFeatureNet(seed=seed), identity=f"small:{seed}", batch_size=16)


def _bytes_to_unicode():
    # GPT-2/CLIP's byte -> printable character table (a bijection of the 256 bytes)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_dir(path, seed: int = 0) -> str:
    """A random-weight CLIP (32-px images, 2 layers) with a character-level BPE tokenizer
    (no merges) saved with save_pretrained: everything CLIPScorer loads, offline."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )
    path = str(path)
    os.makedirs(path, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok_dir = os.path.join(path, "_tok")
    os.makedirs(tok_dir, exist_ok=True)
    with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


class FakeGenerator:
    """Deterministic images from (prompt, seed, guidance): colour from a hash of the prompt,
    noise from the seed, brightness scaled by the guidance. Records every call."""

    def __init__(self, size: int = 48, stages: int = 2):
        self.size, self.calls, self.num_stages = size, [], stages

    def __call__(self, prompts, *, seed=0, **settings):
        self.calls.append((list(prompts), seed, dict(settings)))
        g = settings.get("guidance")
        w = g[0] if isinstance(g, list) else g
        w = 1.0 if w is None else float(w)
        rng = np.random.default_rng(seed)
        out = []
        for p in prompts:
            base = np.array([zlib.crc32(p.encode()) >> s & 255 for s in (0, 8, 16)], np.float64)
            img = base[None, None, :] * min(w, 4.0) / 4.0 + rng.normal(0, 20, (self.size, self.size, 3))
            out.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))
        return out


def make_samples(folder, num_items, systems=("model", REFERENCE), size=24, seed=0):
    """A samples folder with a manifest: one image per system and item."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    items = []
    for i in range(num_items):
        images = {}
        for s in systems:
            name = f"{s}-{i}.png"
            random_image(rng, size, size).save(os.path.join(folder, name))
            images[s] = [name]
        items.append({"id": str(i), "caption": f"caption number {i}", "images": images})
    write_manifest(str(folder), [{"label": s, "spec": None, "settings": {}} for s in systems], items)
    return str(folder)
