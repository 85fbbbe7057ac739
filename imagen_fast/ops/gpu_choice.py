"""Which GPU kernel backend, triton or cuda, runs an op: taken from measurements.

Both backends serve group_norm_silu (forward and backward), dynamic_threshold and
sampler_step on CUDA GPUs. Which one is faster depends on the op, the shape and the
card, so the automatic choice reads ``gpu_choice.json`` beside this file: the GPU op
benchmark (``python -m benchmarks.bench_ops --device cuda``) times both backends forced
at every shape of the Imagen shape table and writes one entry per
(op, GPU architecture, shape class) with the winner and both timings; the file is
committed with the results it came from.

A call is matched to the entries of its op and architecture (``sm_90``: H100/H200):
1. an entry of its exact shape class: its winner ("measured");
2. else entries with the same dtype and layout: the one nearest in log2 sizes
   ("nearest measured shape class", said once in the log per op and architecture);
3. else nothing was measured for this GPU: the default order, triton then cuda,
   said once in the log per op and architecture with the reason.
IMAGEN_FAST_GPU_CHOICE=/path/to/table.json reads another table (the benchmark's own
output, say, before it is committed).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..kernels.layout import is_channels_last

log = logging.getLogger("imagen_fast")

TABLE_PATH = Path(__file__).with_name("gpu_choice.json")
CHOSEN_OPS = ("group_norm_silu_fwd", "group_norm_silu_bwd", "dynamic_threshold", "sampler_step")
GPU_BACKENDS = ("triton", "cuda")          # the default order where nothing was measured
TABLE_VERSION = 1

_lock = threading.Lock()
_tables: Dict[str, List[dict]] = {}
_picked: Dict[tuple, Tuple[str, str, str]] = {}
_logged: set = set()
_arch: Dict[int, Tuple[str, str]] = {}


def _bits(n: int) -> int:
    """log2 bucket of a size (the same unit as the triton autotuner's shape classes)."""
    return max(0, int(n)).bit_length()


def shape_class(op: str, x: torch.Tensor) -> Dict[str, object]:
    """The shape class of a call, from its main tensor (x, or z_t / x0).

    Strings must match exactly; integers are log2 buckets, compared by distance.
    """
    if op not in CHOSEN_OPS:
        raise ValueError(f"op must be one of {CHOSEN_OPS}, got {op!r}")
    dtype = str(x.dtype).replace("torch.", "")
    if op.startswith("group_norm"):
        return {"dtype": dtype, "layout": "nhwc" if is_channels_last(x) else "nchw",
                "numel_bits": _bits(x.numel()), "channels_bits": _bits(x.shape[1])}
    n = x.shape[0]
    return {"dtype": dtype, "per_sample_bits": _bits(x.numel() // max(1, n)), "batch_bits": _bits(n)}


def arch_of(device: torch.device) -> Tuple[str, str]:
    """(architecture, GPU name) of a CUDA device, e.g. ("sm_90", "NVIDIA H100 80GB HBM3")."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _arch:
        p = torch.cuda.get_device_properties(idx)
        _arch[idx] = (f"sm_{p.major}{p.minor}", p.name)
    return _arch[idx]


# ------------------------------------------------------------------------ table
def _validate(entries, where: str) -> List[dict]:
    if not isinstance(entries, list):
        raise ValueError(f"{where}: 'entries' must be a list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"{where}: entry {i} must be an object")
        for key in ("op", "arch", "class", "backend"):
            if key not in e:
                raise ValueError(f"{where}: entry {i} has no {key!r}")
        if e["op"] not in CHOSEN_OPS:
            raise ValueError(f"{where}: entry {i}: op must be one of {CHOSEN_OPS}, got {e['op']!r}")
        if e["backend"] not in GPU_BACKENDS:
            raise ValueError(f"{where}: entry {i}: backend must be one of {GPU_BACKENDS}, "
                             f"got {e['backend']!r}")
        if not isinstance(e["class"], dict):
            raise ValueError(f"{where}: entry {i}: 'class' must be an object")
    return entries


def table_path() -> Path:
    env = os.environ.get("IMAGEN_FAST_GPU_CHOICE", "").strip()
    return Path(env) if env else TABLE_PATH


def read_table(path: Optional[Path] = None) -> List[dict]:
    """The entries of a choice table (validated); a missing file has none."""
    path = Path(path) if path is not None else table_path()
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"GPU choice table {path} is unreadable: {e}") from None
    if not isinstance(data, dict) or data.get("version") != TABLE_VERSION:
        raise ValueError(f"GPU choice table {path}: expected an object with version {TABLE_VERSION}")
    return _validate(data.get("entries", []), str(path))


def _entries() -> List[dict]:
    key = str(table_path())
    with _lock:
        if key not in _tables:
            _tables[key] = read_table(Path(key))
        return _tables[key]


def merge_entries(old: Sequence[dict], new: Sequence[dict]) -> List[dict]:
    """Entries of ``new`` replace those of ``old`` with the same (op, arch, class)."""
    def key(e):
        return (e["op"], e["arch"], json.dumps(e["class"], sort_keys=True))
    merged = {key(e): e for e in _validate(list(old), "old entries")}
    merged.update({key(e): e for e in _validate(list(new), "new entries")})
    return [merged[k] for k in sorted(merged)]


def write_table(entries: Sequence[dict], path: Optional[Path] = None) -> Path:
    path = Path(path) if path is not None else TABLE_PATH
    doc = {"version": TABLE_VERSION,
           "about": "triton vs cuda per (op, arch, shape class), measured by "
                    "`python -m benchmarks.bench_ops --device cuda`; read by imagen_fast/ops/gpu_choice.py",
           "entries": list(entries)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    with _lock:
        _tables.clear()
        _picked.clear()
    return path


# ----------------------------------------------------------------------- choice
def _distance(a: dict, b: dict) -> Optional[int]:
    """None when a discrete field differs, else the summed gap of the log2 buckets."""
    if a.keys() != b.keys():
        return None
    gap = 0
    for k, v in a.items():
        w = b[k]
        if isinstance(v, str) or isinstance(w, str):
            if v != w:
                return None
        else:
            gap += abs(int(v) - int(w))
    return gap


def choose(op: str, arch: str, cls: dict, entries: Sequence[dict]) -> Tuple[str, str, str]:
    """(backend, how, why) for a call; how is "measured", "nearest" or "default"."""
    mine = [e for e in entries if e["op"] == op and e["arch"] == arch]
    scored = [(d, e) for e in mine if (d := _distance(cls, e["class"])) is not None]
    if scored:
        gap, best = min(scored, key=lambda de: de[0])
        timing = ", ".join(f"{b} {ms:.4g} ms" for b, ms in sorted(best.get("ms", {}).items()))
        where = f"on {best.get('gpu', arch)}" + (f": {timing}" if timing else "")
        if gap == 0:
            return best["backend"], "measured", f"measured faster at this shape class {where}"
        return best["backend"], "nearest", (f"nearest measured shape class {best['class']} "
                                            f"(this call {cls}) {where}")
    if mine:
        why = f"no measurement for {op} at dtype/layout of {cls} on {arch}"
    else:
        why = f"nothing measured for {op} on {arch} in {table_path().name}"
    return GPU_BACKENDS[0], "default", (f"{why}; default order {' then '.join(GPU_BACKENDS)} "
                                        f"(measure with `python -m benchmarks.bench_ops --device cuda`)")


def pick(op: str, arch: str, x: torch.Tensor, gpu: str = "") -> str:
    """The backend for this call; says once in the log when it was not measured exactly."""
    cls = shape_class(op, x)
    key = (op, arch, tuple(sorted(cls.items())), str(table_path()))
    hit = _picked.get(key)
    if hit is None:
        hit = choose(op, arch, cls, _entries())
        _picked[key] = hit
    backend, how, why = hit
    if how != "measured" and (op, arch, how) not in _logged:
        _logged.add((op, arch, how))
        level = logging.WARNING if how == "default" else logging.INFO
        log.log(level, "imagen_fast.%s on %s%s: using backend %r (%s)", op, arch,
                f" ({gpu})" if gpu else "", backend, why)
    return backend


def pick_for_device(op: str, device: torch.device, x: torch.Tensor) -> str:
    arch, gpu = arch_of(device)
    return pick(op, arch, x, gpu)
