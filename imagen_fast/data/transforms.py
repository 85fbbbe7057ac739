"""Image decoding and the training transforms (Pillow + torch, no torchvision).

* base stage: resize the shorter side to ``size``, center crop ``size x size``.
* super-resolution stages: resize the shorter side to ``resize`` (>= ``size``), take a random
  (or center) ``size x size`` crop, and make the low-resolution conditioning image on the fly
  by downsampling that crop to ``lowres_size`` (bicubic with antialiasing).
* super-resolution stages trained on crops (``crop_size``, as the paper's 256->1024 model,
  trained on 256 crops of 1024 images with 64 px conditioning): the low-resolution image is
  made from the WHOLE ``size`` image, as at sampling time, and both are cut at the same
  place: a random ``crop_size`` crop at offsets that are multiples of the factor
  ``size / lowres_size``, and the ``crop_size / factor`` crop of the low-res image at the
  offsets divided by the factor, so the two pixel grids line up exactly.

Images become float tensors in [-1, 1], (3, H, W). No horizontal flip: captions say "left" and
"right", and a flip would make them wrong.
"""
from __future__ import annotations

import io
import random
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

try:
    from PIL import Image
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("imagen_fast.data needs Pillow (pip install pillow)") from e

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS,
             "box": Image.BOX, "nearest": Image.NEAREST}
ImageSource = Union[bytes, bytearray, memoryview, str, Path, "Image.Image"]


def open_image(src: ImageSource, *, draft_size: Optional[int] = None) -> "Image.Image":
    """Decode ``src`` (bytes, a path or a PIL image) to an RGB PIL image, fully loaded.

    Transparent images are composited on white. ``draft_size`` lets JPEG decoding downscale
    by a power of two while both sides stay >= draft_size (much faster for large photos).
    Raises on any decoding problem (the dataset turns that into a counted skip)."""
    if isinstance(src, Image.Image):
        img = src
    else:
        fp = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else open(src, "rb")
        with warnings.catch_warnings():
            # DecompressionBombWarning and friends: raise, the dataset counts the skip
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
        if not isinstance(src, (bytes, bytearray, memoryview)):
            fp.close()
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def to_tensor(img: "Image.Image") -> Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return a.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_pil(x: Tensor) -> "Image.Image":
    """(3, H, W) tensor in [-1, 1] -> RGB PIL image (for sample grids and checks)."""
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), "RGB")


def crop_grid_error(size: int, lowres_size: Optional[int], crop_size: int) -> Optional[str]:
    """Why ``crop_size`` crops of a ``size`` image can not be cut in step with its
    ``lowres_size`` low-res version (None when they can). The one home of this rule:
    the transform and the training config both ask it."""
    if not isinstance(crop_size, int) or isinstance(crop_size, bool) or crop_size < 0:
        return f"must be an int >= 0 (0 = the whole image), got {crop_size!r}"
    if crop_size == 0:
        return None
    if not lowres_size:
        return "needs a low-res size: crops are for super-resolution stages"
    if size % lowres_size:
        return (f"needs the resolution ({size}) to be a multiple of the low-res resolution "
                f"({lowres_size}), so crops can be aligned")
    if crop_size > size:
        return f"must be <= the resolution ({size}), got {crop_size}"
    factor = size // lowres_size
    if crop_size % factor:
        return (f"must be a multiple of the super-resolution factor {factor} "
                f"({size} / {lowres_size}), got {crop_size}")
    return None


class ImageTransform:
    """PIL image -> (image (3, S, S), lowres (3, s, s) or None), where S = crop_size or
    size and s = S * lowres_size / size.

    Args:
        size: output side.
        resize: the shorter side is resized to this before cropping (default ``size``;
            0 = no resize, the crop is taken from the image as it is, which must be >= size).
        crop: 'center' or 'random' (random crops for super-resolution training).
        lowres_size: side of the conditioning image (None = base stage, no low-res image).
        resample: 'bicubic' (default), 'bilinear', 'lanczos', 'box', 'nearest'.
        crop_size: super-resolution training on crops (0 or None = the whole image): the
            low-res image is made from the whole ``size`` image, then a random crop_size
            crop of the image and the aligned crop of the low-res image are returned (see
            the module docstring). Drawn from ``rng`` after the ``crop`` above.
    """

    def __init__(self, size: int, *, resize: Optional[int] = None, crop: str = "center",
                 lowres_size: Optional[int] = None, resample: str = "bicubic",
                 crop_size: Optional[int] = None):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size: expected a positive int, got {size!r}")
        resize = size if resize is None else resize
        if not isinstance(resize, int) or (resize != 0 and resize < size):
            raise ValueError(f"resize: expected 0 or an int >= size ({size}), got {resize!r}")
        if crop not in ("center", "random"):
            raise ValueError(f"crop: expected 'center' or 'random', got {crop!r}")
        if lowres_size is not None and (not isinstance(lowres_size, int) or not 1 <= lowres_size < size):
            raise ValueError(f"lowres_size: expected an int in [1, size={size}), got {lowres_size!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample: expected one of {sorted(_RESAMPLE)}, got {resample!r}")
        crop_size = crop_size or 0
        problem = crop_grid_error(size, lowres_size, crop_size)
        if problem:
            raise ValueError(f"crop_size: {problem}")
        self.size, self.resize, self.crop = size, resize, crop
        self.lowres_size, self.resample, self.crop_size = lowres_size, resample, crop_size

    @property
    def draft_size(self) -> int:
        return self.resize or 0

    def crop_image(self, img: "Image.Image", rng: Optional[random.Random] = None) -> "Image.Image":
        """Resize + crop, as a PIL image."""
        w, h = img.size
        if self.resize:
            s = self.resize / min(w, h)
            nw, nh = max(self.resize, round(w * s)), max(self.resize, round(h * s))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), _RESAMPLE[self.resample], reducing_gap=3.0)
            w, h = nw, nh
        if min(w, h) < self.size:
            raise ValueError(f"image {w}x{h} is smaller than the crop {self.size}")
        if self.crop == "random":
            rng = rng or random
            x0, y0 = rng.randint(0, w - self.size), rng.randint(0, h - self.size)
        else:
            x0, y0 = (w - self.size) // 2, (h - self.size) // 2
        if (x0, y0, w, h) != (0, 0, self.size, self.size):
            img = img.crop((x0, y0, x0 + self.size, y0 + self.size))
        return img

    def aligned_offset(self, rng: Optional[random.Random] = None) -> Tuple[int, int]:
        """(x0, y0) of a random crop_size crop, both multiples of the factor."""
        rng = rng or random
        factor = self.size // self.lowres_size
        last = (self.size - self.crop_size) // factor
        return factor * rng.randint(0, last), factor * rng.randint(0, last)

    def __call__(self, img: "Image.Image", rng: Optional[random.Random] = None) -> Tuple[Tensor, Optional[Tensor]]:
        img = self.crop_image(img, rng)
        low = None
        if self.lowres_size:
            low = img.resize((self.lowres_size, self.lowres_size), _RESAMPLE[self.resample])
        if self.crop_size and self.crop_size != self.size:
            x0, y0 = self.aligned_offset(rng)
            c, factor = self.crop_size, self.size // self.lowres_size
            img = img.crop((x0, y0, x0 + c, y0 + c))
            lx, ly, lc = x0 // factor, y0 // factor, c // factor
            low = low.crop((lx, ly, lx + lc, ly + lc))
        return to_tensor(img), None if low is None else to_tensor(low)

    def __repr__(self) -> str:
        return (f"ImageTransform(size={self.size}, resize={self.resize}, crop={self.crop!r}, "
                f"lowres_size={self.lowres_size}, resample={self.resample!r}, "
                f"crop_size={self.crop_size})")



def image_grid(images: Sequence["Image.Image"], columns: int) -> "Image.Image":
    """PIL images of one size -> one PIL image, ``columns`` wide, rows filled in order."""
    from PIL import Image

    if not images:
        raise ValueError("images: need at least one image")
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    return grid

def transform_for_stage(size: int, lowres_size: Optional[int] = None, *, random_crop: Optional[bool] = None,
                        resize: Optional[int] = None, crop_size: Optional[int] = None) -> ImageTransform:
    """The usual transform of a cascade stage: base (``lowres_size=None``): center crop;
    super-resolution: random crop and a low-res image (``random_crop`` overrides), and
    with ``crop_size`` aligned random crops of the pair for training on crops."""
    rc = (lowres_size is not None) if random_crop is None else random_crop
    return ImageTransform(size, resize=resize, crop="random" if rc else "center", lowres_size=lowres_size,
                          crop_size=crop_size)
