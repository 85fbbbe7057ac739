"""Image helpers shared by the instruments: RGB arrays, square crops, loading, tensors."""
from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image

ImageLike = Union[Image.Image, np.ndarray]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image (any mode) or an (H, W, 3) uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image: expected an (H, W, 3) uint8 array, got {image.dtype} "
                             f"{image.shape}")
        return image
    raise TypeError(f"image: expected a PIL image or a uint8 array, got {type(image).__name__}")


def square_resize(image: ImageLike, size: int) -> Image.Image:
    """Centre crop to a square, then PIL bicubic to size x size (no-op at that size)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(to_rgb_array(image))
    img = img.convert("RGB")
    w, h = img.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return img


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as f:
        return f.convert("RGB")


def list_images(folder: str):
    """Image files directly in ``folder`` (sorted); FileNotFoundError when it is missing."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image directory not found: {folder}")
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.lower().endswith(IMAGE_EXTENSIONS))
