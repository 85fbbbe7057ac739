"""Frechet Inception Distance with clean-fid's resizing, and reference statistics cached
on disk.

Pipeline for every image (generated or reference): RGB uint8 -> (references and the
FID-30K samples: centre crop + PIL bicubic to the protocol size, 256) -> ``clean_resize``
to 299x299: PIL bicubic applied to each channel as float32, clipped to [0, 255] (the
"clean" mode of clean-fid, which avoids the aliasing of uint8 and tensor resizers) ->
the feature network (``inception.InceptionV3``: 2048 pool features) -> mean and
covariance (unbiased, as the standard tools) -> Frechet distance.

``FeatureExtractor`` wraps any network that maps (N, 3, 299, 299) floats in [0, 255] to
(N, D) features; tests use small random-weight ones.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .images import ImageLike, list_images, load_rgb, square_resize, to_rgb_array

CLEAN_SIZE = 299
# Bump when the preprocessing changes: cached statistics keyed by it stop matching.
PREPROCESS_VERSION = "square-bicubic/clean-bicubic-299/v1"


def clean_resize(image: ImageLike, size: int = CLEAN_SIZE) -> np.ndarray:
    """(size, size, 3) float32 in [0, 255]: each channel resized by PIL bicubic in float
    mode ("F"), the way clean-fid's "clean" mode does, then clipped."""
    rgb = to_rgb_array(image).astype(np.float32)
    if rgb.shape[:2] == (size, size):
        return rgb
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(rgb[:, :, c]))
                           .resize((size, size), Image.BICUBIC)) for c in range(3)]
    return np.clip(np.stack(channels, axis=2), 0.0, 255.0).astype(np.float32)


def _pool_map(fn, items):
    # PIL releases the GIL while resizing and decoding, so threads do help here
    if len(items) < 4:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, items))


class FeatureExtractor:
    """Images -> (N, D) float64 features through ``model`` (float (N, 3, 299, 299) in
    [0, 255] -> (N, D)). ``identity`` names the network and its weights for caches
    (an InceptionV3 from ``load_inception`` gives its weights' sha256)."""

    def __init__(self, model: Callable, *, identity: Optional[str] = None, device=None,
                 batch_size: int = 32, input_size: int = CLEAN_SIZE):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
        self.model = model
        if identity is None:
            sha = getattr(model, "weights_sha256", None)
            identity = f"{type(model).__name__}:{sha}" if sha else None
        if identity is None:
            raise ValueError("identity: needed for a model without weights_sha256 (it keys "
                             "the statistics cache)")
        self.identity = identity
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.batch_size = batch_size
        self.input_size = input_size

    @classmethod
    def inception(cls, weights: str, device=None, batch_size: int = 32,
                  input_size: int = CLEAN_SIZE) -> "FeatureExtractor":
        """The FID Inception from a weights file. ``input_size`` other than 299 (the network
        is convolutional down to 75) is for smoke tests: such FIDs compare with nothing."""
        from .inception import load_inception
        return cls(load_inception(weights, device=device), device=device, batch_size=batch_size,
                   input_size=input_size)

    @torch.no_grad()
    def __call__(self, images: Sequence[ImageLike]) -> np.ndarray:
        images = list(images)
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = _pool_map(lambda im: clean_resize(im, self.input_size),
                              images[i:i + self.batch_size])
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(self.device)
            feats = self.model(x)
            if feats.ndim != 2 or feats.shape[0] != x.shape[0]:
                raise ValueError(f"feature model returned shape {tuple(feats.shape)} for "
                                 f"{x.shape[0]} images; expected (N, D)")
            out.append(feats.double().cpu().numpy())
        if not out:
            return np.zeros((0, 0))
        return np.concatenate(out)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@dataclass
class Statistics:
    """Mean (D,), covariance (D, D) and count of a feature set. ``factor`` (k, D) with
    sigma = factor^T factor is kept for sets of at most D images (centred features /
    sqrt(n - 1)): it makes the distance of such a rank-deficient set cheap."""
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    factor: Optional[np.ndarray] = None

    def save(self, path: str, meta: Optional[dict] = None) -> None:
        tmp = path + ".tmp.npz"
        np.savez(tmp, mu=self.mu, sigma=self.sigma, n=np.array(self.n),
                 meta=np.array(json.dumps(meta or {})))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Statistics":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"statistics file not found: {path}")
        with np.load(path) as f:
            return cls(f["mu"], f["sigma"], int(f["n"]))


class RunningStatistics:
    """Mean and covariance accumulated batch by batch in float64. Sums are taken around a
    shift (the first batch's mean), so the covariance does not lose precision to
    E[x x^T] - mu mu^T cancellation when the features have a large mean."""

    def __init__(self):
        self.n = 0
        self.shift = self.s1 = self.s2 = None
        self.rows: Optional[List[np.ndarray]] = []   # dropped once n exceeds D

    def update(self, feats: np.ndarray) -> None:
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2:
            raise ValueError(f"feats: expected (N, D), got shape {feats.shape}")
        if feats.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = feats.mean(axis=0)
            d = feats.shape[1]
            self.s1, self.s2 = np.zeros(d), np.zeros((d, d))
        elif feats.shape[1] != self.shift.shape[0]:
            raise ValueError(f"feats: width {feats.shape[1]} != earlier {self.shift.shape[0]}")
        c = feats - self.shift
        self.s1 += c.sum(axis=0)
        self.s2 += c.T @ c
        self.n += feats.shape[0]
        if self.rows is not None:
            self.rows.append(feats)
            if self.n > feats.shape[1]:
                self.rows = None

    def result(self) -> Statistics:
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 images, got {self.n}")
        m = self.s1 / self.n
        sigma = (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)
        mu = self.shift + m
        factor = None
        if self.rows is not None:
            factor = (np.concatenate(self.rows) - mu) / np.sqrt(self.n - 1)
        return Statistics(mu, (sigma + sigma.T) / 2, self.n, factor)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, factor1: Optional[np.ndarray] = None,
                     factor2: Optional[np.ndarray] = None) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of S1 S2 (= those of
    S2 S1), which are those of the symmetric PSD matrix R^T S2 R for any factor
    S1 = R R^T. R is, in order of preference: a given ``factor`` (S = F^T F, e.g. the
    centred features of a small set: a k x k problem), the Cholesky factor of a positive
    definite S1 or S2 (more images than features), else V sqrt(W) from an
    eigendecomposition restricted to the non-null space. Only float64 symmetric solvers:
    no complex parts to discard, no epsilon added to the diagonals."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mu1, mu2: expected vectors of one length, got {mu1.shape}, {mu2.shape}")
    d = mu1.shape[0]
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise ValueError(f"{name}: expected ({d}, {d}), got {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name}: has non-finite entries")
    for name, f in (("factor1", factor1), ("factor2", factor2)):
        if f is not None and (f.ndim != 2 or f.shape[1] != d):
            raise ValueError(f"{name}: expected (k, {d}), got {f.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2)
                 - 2.0 * _trace_sqrt_product(s1, s2, factor1, factor2))


def _trace_sqrt_product(s1, s2, f1, f2) -> float:
    if f1 is not None or f2 is not None:
        f, other = (f1, s2) if f1 is not None and (f2 is None or len(f1) <= len(f2)) else (f2, s1)
        m = np.asarray(f, np.float64) @ other @ np.asarray(f, np.float64).T
    else:
        m = None
        for a, b in ((s1, s2), (s2, s1)):
            try:
                low = np.linalg.cholesky(a)
            except np.linalg.LinAlgError:
                continue
            m = low.T @ b @ low
            break
        if m is None:
            w, v = np.linalg.eigh(s1)
            keep = w > w.max() * len(w) * np.finfo(np.float64).eps
            root = v[:, keep] * np.sqrt(w[keep])
            m = root.T @ s2 @ root
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def fid_from_statistics(a: Statistics, b: Statistics) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, a.factor, b.factor)


def _load_resized(size: Optional[int]):
    def load(path):
        img = load_rgb(path)
        return square_resize(img, size) if size else img
    return load


def statistics_of_files(paths: Sequence[str], extractor: FeatureExtractor,
                        size: Optional[int] = None, chunk: int = 256,
                        progress: Optional[Callable[[int], None]] = None) -> Statistics:
    paths = list(paths)
    if not paths:
        raise ValueError("no image files to compute statistics of")
    stats = RunningStatistics()
    load = _load_resized(size)
    for i in range(0, len(paths), chunk):
        stats.update(extractor(_pool_map(load, paths[i:i + chunk])))
        if progress:
            progress(min(chunk, len(paths) - i))
    return stats.result()


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "imagen-fast", "fid")


def file_list_key(paths: Sequence[str], root: Optional[str] = None) -> str:
    """sha256 over the sorted (relative name, size) of every file: a changed, added or
    removed image changes the key; moving the whole set elsewhere does not."""
    h = hashlib.sha256()
    for p in sorted(paths):
        name = os.path.relpath(p, root) if root else os.path.basename(p)
        h.update(f"{name}\0{os.path.getsize(p)}\n".encode())
    return h.hexdigest()


def cached_statistics(paths: Sequence[str], extractor: FeatureExtractor, *,
                      size: Optional[int], root: Optional[str] = None,
                      cache_dir: Optional[str] = None,
                      progress: Optional[Callable[[int], None]] = None):
    """(Statistics, cache file path, was_cached) of the images ``paths``, cached under
    ``cache_dir`` keyed by the extractor's identity (the weights' hash), the
    preprocessing, ``size`` and the file list. ``cache_dir=""`` disables the cache."""
    if not paths:
        raise ValueError("no image files to compute statistics of")
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    key_src = json.dumps({"extractor": extractor.identity, "preprocess": PREPROCESS_VERSION,
                          "input_size": extractor.input_size, "size": size,
                          "files": file_list_key(paths, root)}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    path = os.path.join(cache_dir, f"ref-{key}.npz") if cache_dir else None
    if path and os.path.isfile(path):
        try:
            return Statistics.load(path), path, True
        except (OSError, ValueError, KeyError):
            pass  # unreadable (e.g. a torn write by an older version): recompute
    stats = statistics_of_files(paths, extractor, size=size, progress=progress)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        stats.save(path, meta=json.loads(key_src) | {"n": stats.n})
    return stats, path, False


def fid_of_folders(folder_a: str, folder_b: str, extractor: FeatureExtractor, *,
                   size: Optional[int] = None, cache_dir: Optional[str] = None) -> dict:
    """FID between two image folders; the second one's statistics are cached (it is
    usually the reference set)."""
    a = list_images(folder_a)
    b = list_images(folder_b)
    for name, files, folder in (("folder_a", a, folder_a), ("folder_b", b, folder_b)):
        if len(files) < 2:
            raise ValueError(f"{name}: {folder} holds {len(files)} image(s); FID needs at least 2")
    sa = statistics_of_files(a, extractor, size=size)
    sb, cache, _ = cached_statistics(b, extractor, size=size, root=folder_b, cache_dir=cache_dir)
    return {"fid": fid_from_statistics(sa, sb), "num_a": sa.n, "num_b": sb.n,
            "extractor": extractor.identity, "reference_cache": cache}



def fid_coco(system, coco, extractor: FeatureExtractor, *, num: int = 30000, size: int = 256,
             seed: int = 0, batch_size: int = 8, samples_dir: Optional[str] = None,
             cache_dir: Optional[str] = None, clip_scorer=None, overwrite: bool = False,
             progress: bool = False) -> dict:
    """The paper's zero-shot FID-30K on a COCO-format caption set.

    ``num`` captions drawn at random (seeded, without replacement) from all annotations;
    one ``size`` x ``size`` sample each (square-resized if the system gives another
    size); reference statistics from every image of the set, centre-cropped and resized
    to ``size`` the same way, computed once and cached (``cached_statistics``). With
    ``clip_scorer`` (``clip_score.CLIPScorer``) the same samples also get a CLIP score
    against their captions. With ``samples_dir`` the samples are kept as PNGs (plus a
    manifest pairing each with its COCO image) and a rerun resumes from them.
    """
    from .coco import CocoCaptions, load_coco
    from .manifest import REFERENCE, write_manifest
    from .samples import SampleDir, generate, tqdm_progress

    if not isinstance(coco, CocoCaptions):
        coco = load_coco(coco)
    if num < 2:
        raise ValueError(f"num: FID needs at least 2 samples, got {num}")
    if samples_dir and system.label == REFERENCE:
        raise ValueError(f"label: {REFERENCE!r} names the COCO images in the samples manifest; "
                         f"give the system another label")
    chosen = coco.sample(num, seed)
    prompts = [c for _, c in chosen]
    ref_paths = coco.image_paths()
    ref, ref_cache, was_cached = cached_statistics(
        ref_paths, extractor, size=size, root=coco.image_dir, cache_dir=cache_dir,
        progress=tqdm_progress(len(ref_paths), "reference", progress))
    store = None
    if samples_dir:
        names = [f"{i:05d}" for i in range(num)]
        run = {"system": system.describe(), "seed": seed, "batch_size": batch_size, "size": size,
               "captions_file": coco.captions_file, "prompts": prompts}
        store = SampleDir(samples_dir, names, run, overwrite=overwrite)
    stats, clip_scores = RunningStatistics(), []
    for idx, images in generate(system, prompts, seed=seed, batch_size=batch_size, size=size,
                                sample_dir=store, progress=tqdm_progress(num, system.label, progress)):
        stats.update(extractor(images))
        if clip_scorer is not None:
            clip_scores.extend(clip_scorer.score(images, [prompts[i] for i in idx]).tolist())
    result = {"fid": fid_from_statistics(stats.result(), ref), "num": num, "size": size,
              "seed": seed, "system": system.describe(), "extractor": extractor.identity,
              "captions_file": coco.captions_file,
              "reference": {"num_images": ref.n, "cache": ref_cache, "was_cached": was_cached}}
    if clip_scorer is not None:
        result["clip_score"] = float(np.mean(clip_scores))
        result["clip_model"] = clip_scorer.identity
    if store is not None:
        items = [{"id": str(i), "caption": cap, "coco_image_id": image_id,
                  "images": {system.label: [os.path.basename(store.path_of(i))],
                             REFERENCE: [coco.images[image_id]]}}
                 for i, (image_id, cap) in enumerate(chosen)]
        write_manifest(samples_dir, [system.describe(), {"label": REFERENCE, "spec": coco.image_dir,
                                                         "settings": {}}], items)
        result["samples_dir"] = os.path.abspath(samples_dir)
    return result
