"""Importing the peer libraries offline beside this torch build (tests, benchmarks).

imagen-pytorch 2.1.0 has two import-time problems here:
* PyPI's torchvision wheel lacks the compiled operators this torch build expects;
  importing it fails in ``torchvision._meta_registrations`` ("operator
  torchvision::nms does not exist"). Those registrations only matter for
  torchvision's own ops under meta tensors, which nothing here uses: a stand-in
  module is put in their place before the import.
* Its Unet's default ``text_embed_dim`` asks the Hugging Face hub for the T5-base
  config at import time. Offline, ``T5Config.from_pretrained`` is answered with a
  local T5Config of T5-base's width (768); only that width is read (the T5 encoder
  itself is never run: callers pass text embeddings).
The first is process-wide; the second lasts only while imagen-pytorch imports.
"""
from __future__ import annotations

import sys
import types

T5_BASE_WIDTH = 768


def import_imagen_pytorch():
    """imagen_pytorch, imported with the two workarounds above."""
    if "imagen_pytorch" in sys.modules:
        return sys.modules["imagen_pytorch"]
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import transformers
    config = transformers.T5Config
    own = config.__dict__.get("from_pretrained")       # normally inherited, so None
    config.from_pretrained = classmethod(lambda cls, name, **kw: cls(d_model=T5_BASE_WIDTH))
    try:
        import imagen_pytorch
    finally:        # imagen-pytorch caches the config it got; nobody else sees the stand-in
        if own is None:
            del config.from_pretrained
        else:
            config.from_pretrained = own
    return imagen_pytorch
