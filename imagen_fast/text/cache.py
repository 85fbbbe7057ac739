"""Precomputed caption embeddings in a memory-mapped store.

The text encoder is frozen, so a dataset's captions are encoded once and training reads
them back. Layout of a cache directory::

    header.json      {"format": "imagen-fast-text-cache", "version": 1, "encoder": name,
                      "dim": D, "max_length": L, "dtype": "float16",
                      "num_captions": N, "num_tokens": T}
    embeddings.f16   (T, D) float16, little endian: the token rows of every caption, back to back
    offsets.i64      (N + 1,) int64: caption i owns rows offsets[i]:offsets[i+1]
    captions.jsonl   one JSON string per line, caption i on line i (identical captions stored once)

Masks are implicit: caption i has ``offsets[i+1] - offsets[i]`` real tokens, the rest is
padding. Reading back gives the same ``(embeddings (B, L, D), mask (B, L))`` as the encoder,
to fp16 rounding. An ``EmbeddingCache`` is itself a text encoder (``encode(prompts)``), so a
training loop takes either. The directory is written under a temporary name and renamed
into place, so a killed build never leaves a half-written cache behind.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .base import TextEncoder, check_prompts

FORMAT = "imagen-fast-text-cache"
VERSION = 1
_FP16_MAX = 65504.0


def build_embedding_cache(encoder: TextEncoder, captions: Iterable[str], out_dir: Union[str, os.PathLike],
                          *, batch_size: int = 256, overwrite: bool = False,
                          progress: Optional[callable] = None) -> "EmbeddingCache":
    """Encode the distinct ``captions`` with ``encoder`` into ``out_dir``; returns the opened cache.

    ``progress(done, total)`` is called after each batch when given. Raises ValueError if an
    embedding does not fit float16 (it would be stored as inf)."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"out_dir: {out} exists (pass overwrite=True to replace it)")
    unique = list(dict.fromkeys(check_prompts(list(captions))))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    offsets = np.zeros(len(unique) + 1, dtype=np.int64)
    try:
        with open(tmp / "embeddings.f16", "wb") as fe, open(tmp / "captions.jsonl", "w", encoding="utf-8") as fc:
            row = 0
            for start in range(0, len(unique), batch_size):
                chunk = unique[start:start + batch_size]
                emb, mask = encoder.encode(chunk)
                emb = emb.float().cpu()
                lengths = mask.sum(1).cpu().tolist()
                for j, (cap, n) in enumerate(zip(chunk, lengths)):
                    rows = emb[j, :n]
                    peak = rows.abs().max().item() if n else 0.0
                    if not peak <= _FP16_MAX:  # also catches nan
                        raise ValueError(f"captions: embedding of {cap!r} is not finite in float16 "
                                         f"(max |x| = {peak:.4g})")
                    fe.write(rows.to(torch.float16).numpy().astype("<f2", copy=False).tobytes())
                    fc.write(json.dumps(cap, ensure_ascii=False) + "\n")
                    row += n
                    offsets[start + j + 1] = row
                if progress is not None:
                    progress(min(start + batch_size, len(unique)), len(unique))
            fe.flush()
            os.fsync(fe.fileno())
        offsets.astype("<i8").tofile(tmp / "offsets.i64")
        header = {"format": FORMAT, "version": VERSION, "encoder": encoder.name, "dim": int(encoder.dim),
                  "max_length": int(encoder.max_length), "dtype": "float16",
                  "num_captions": len(unique), "num_tokens": int(offsets[-1])}
        (tmp / "header.json").write_text(json.dumps(header, indent=1))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EmbeddingCache(out)


class EmbeddingCache(TextEncoder):
    """Read side of the cache; also a ``TextEncoder`` over the cached captions.

    Args:
        path: the cache directory.
        fallback: optional encoder (same ``name``) used for captions not in the cache;
            without one, encoding an unknown caption raises KeyError.
        output_dtype: dtype of returned embeddings (float32 by default).

    Memory maps are opened lazily in each process, so the object can be handed to
    DataLoader workers (it pickles as its path)."""

    def __init__(self, path: Union[str, os.PathLike], *, fallback: Optional[TextEncoder] = None,
                 output_dtype: torch.dtype = torch.float32, batch_size: int = 1024):
        self.path = Path(path)
        hp = self.path / "header.json"
        if not hp.is_file():
            raise FileNotFoundError(f"path: {self.path} is not an embedding cache (no header.json)")
        self.header = json.loads(hp.read_text())
        if self.header.get("format") != FORMAT or self.header.get("version") != VERSION:
            raise ValueError(f"path: {self.path} has format {self.header.get('format')!r} "
                             f"version {self.header.get('version')!r}; expected {FORMAT!r} {VERSION}")
        self.name = self.header["encoder"]
        self.dim = int(self.header["dim"])
        self.max_length = int(self.header["max_length"])
        self.output_dtype = output_dtype
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        if fallback is not None:
            self.check_encoder(fallback)
        self.fallback = fallback
        self._emb = self._off = None
        self._index: Optional[Dict[str, int]] = None
        n, t = self.header["num_captions"], self.header["num_tokens"]
        if (self.path / "offsets.i64").stat().st_size != 8 * (n + 1) or \
                (self.path / "embeddings.f16").stat().st_size != 2 * t * self.dim:
            raise ValueError(f"path: {self.path}: file sizes disagree with header.json (truncated cache?)")

    # -- lazy per-process state ------------------------------------------------------------
    def __getstate__(self):
        d = dict(self.__dict__)
        d["_emb"] = d["_off"] = d["_index"] = None
        return d

    def _open(self):
        if self._emb is None:
            n, t = self.header["num_captions"], self.header["num_tokens"]
            self._off = np.fromfile(self.path / "offsets.i64", dtype="<i8", count=n + 1)
            self._emb = (np.memmap(self.path / "embeddings.f16", dtype="<f2", mode="r", shape=(t, self.dim))
                         if t else np.zeros((0, self.dim), dtype="<f2"))

    @property
    def captions(self) -> List[str]:
        with open(self.path / "captions.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def _lookup(self) -> Dict[str, int]:
        if self._index is None:
            self._index = {c: i for i, c in enumerate(self.captions)}
        return self._index

    # -- queries -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.header["num_captions"])

    def __contains__(self, caption: str) -> bool:
        return caption in self._lookup()

    def index(self, caption: str) -> int:
        try:
            return self._lookup()[caption]
        except KeyError:
            raise KeyError(f"caption not in the cache {self.path}: {caption!r}") from None

    def lengths(self) -> np.ndarray:
        self._open()
        return np.diff(self._off)

    def check_encoder(self, encoder: TextEncoder) -> None:
        """ValueError unless ``encoder`` is the one this cache was built with."""
        if encoder.name != self.name or int(encoder.dim) != self.dim:
            raise ValueError(f"encoder: cache {self.path} holds {self.name!r} (dim {self.dim}); "
                             f"got {encoder.name!r} (dim {encoder.dim})")

    def get(self, i: int) -> Tensor:
        """Token embeddings of caption ``i``: (n_i, D) float16."""
        self._open()
        if not 0 <= i < len(self):
            raise IndexError(f"i: {i} out of range for a cache of {len(self)} captions")
        a, b = int(self._off[i]), int(self._off[i + 1])
        return torch.from_numpy(np.array(self._emb[a:b]))

    def batch(self, indices: Sequence[int], *, max_length: Optional[int] = None,
              dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
        """(B, L, D) embeddings and (B, L) mask for cached captions ``indices``; L is the longest
        of them, or exactly ``max_length`` (longer captions truncated)."""
        rows = [self.get(int(i)) for i in indices]
        dtype = dtype or self.output_dtype
        L = max_length if max_length is not None else max((r.shape[0] for r in rows), default=0)
        emb = torch.zeros(len(rows), L, self.dim, dtype=dtype)
        mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for j, r in enumerate(rows):
            n = min(r.shape[0], L)
            emb[j, :n] = r[:n].to(dtype)
            mask[j, :n] = True
        return emb, mask

    def _encode_batch(self, prompts: List[str]) -> Tuple[Tensor, Tensor]:
        lookup = self._lookup()
        missing = [p for p in prompts if p not in lookup]
        if missing and self.fallback is None:
            raise KeyError(f"{len(missing)} of {len(prompts)} prompts are not in the cache {self.path}, "
                           f"e.g. {missing[0]!r} (give a fallback encoder to encode them live)")
        if not missing:
            return self.batch([lookup[p] for p in prompts], dtype=torch.float32)
        live_e, live_m = self.fallback.encode(missing)
        live = {p: (live_e[k, :int(live_m[k].sum())].float().cpu()) for k, p in enumerate(missing)}
        rows = [live[p] if p in live else self.get(lookup[p]).float() for p in prompts]
        L = max(r.shape[0] for r in rows)
        emb = torch.zeros(len(rows), L, self.dim)
        mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for j, r in enumerate(rows):
            emb[j, :r.shape[0]] = r
            mask[j, :r.shape[0]] = True
        return emb, mask
