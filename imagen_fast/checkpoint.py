"""Atomic, resumable training checkpoints: safetensors for tensors, JSON for the rest.

Layout of a run directory:

    <dir>/step_00001200/model.safetensors      weights
                        ema.safetensors        EMA weights (when EMA is on)
                        optimizer.safetensors  optimizer tensors; structure in state.json
                        state.json             step, data position, RNG states, config,
                                               scheduler, scaler, "complete": true
    <dir>/latest                               name of the newest complete step directory

A checkpoint is written into a hidden temporary directory, every file fsynced, then
renamed into place (rename is atomic on POSIX) and the parent directory fsynced;
only then does ``latest`` move (write + fsync + rename). A crash or a full disk at
any moment leaves the previous checkpoint complete and ``latest`` pointing at it.
Nothing is pickled.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("imagen_fast")
STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, or for another model)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ------------------------------------------------------------- state (de)flattening
def flatten_optimizer_state(state: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """optimizer.state_dict() -> (tensors for safetensors, JSON-able rest)."""
    tensors: Dict[str, torch.Tensor] = {}
    meta_state: List[list] = []    # [key, entry] pairs: keys are ints or parameter names
    for idx, per_param in state["state"].items():
        entry = {}
        for k, v in per_param.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
                entry[k] = {"tensor": f"state.{idx}.{k}"}
            else:
                entry[k] = {"value": v}
        meta_state.append([idx, entry])
    return tensors, {"state": meta_state, "param_groups": state["param_groups"]}


def unflatten_optimizer_state(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    state = {}
    for idx, entry in meta["state"]:
        state[idx] = {k: tensors[v["tensor"]] if "tensor" in v else v["value"]
                           for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng_state() -> Dict[str, Any]:
    """Python, numpy and torch (CPU and every CUDA device) RNG states, JSON-able."""
    np_state = np.random.get_state()
    out = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available() else [],
    }
    return out


def restore_rng_state(state: Dict[str, Any]) -> None:
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


def _cpu_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


# ------------------------------------------------------------------------ saving
def save_checkpoint(run_dir: Path, step: int, *, model: Dict[str, torch.Tensor],
                    state: Dict[str, Any], optimizer: Optional[Dict[str, Any]] = None,
                    ema: Optional[Dict[str, torch.Tensor]] = None, keep: int = 3) -> Path:
    """Write one checkpoint atomically; keep the newest ``keep`` (older ones removed).

    On failure (disk full, I/O error) the partial files are removed, the previous
    checkpoint is untouched, and the exception propagates.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"{STEP_PREFIX}{step:08d}"
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(_cpu_state_dict(model), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(_cpu_state_dict(ema), str(tmp / "ema.safetensors"))
        state = dict(state, step=step, complete=True)
        if optimizer is not None:
            tensors, meta = flatten_optimizer_state(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            state["optimizer"] = meta
        with open(tmp / "state.json", "w") as f:
            json.dump(state, f)
        for p in tmp.iterdir():
            _fsync_file(p)
        _fsync_dir(tmp)
        if final.exists():                       # re-saving the same step: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
        write_text_atomic(run_dir / "latest", name + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(run_dir, keep)
    return final


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoints, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in sorted(run_dir.glob(f"{STEP_PREFIX}*")):
        if p.is_dir() and (p / "state.json").is_file() and (p / "model.safetensors").is_file():
            out.append(p)
    return out


def _prune(run_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    ckpts = list_checkpoints(run_dir)
    for p in ckpts[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in run_dir.glob(f".{STEP_PREFIX}*.tmp-*"):   # leftovers of killed writers
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------- loading
def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint: ``latest`` if valid, else the newest on disk."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if pointer.is_file():
        cand = run_dir / pointer.read_text().strip()
        if cand in list_checkpoints(run_dir):
            return cand
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """{'model', 'ema' (or None), 'optimizer' (or None), 'state'} from one step directory."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint: {e}") from None
    if not state.get("complete"):
        raise CheckpointError(f"{path} is incomplete")
    out = {"state": state, "model": load_file(str(path / "model.safetensors")), "ema": None,
           "optimizer": None}
    if (path / "ema.safetensors").is_file():
        out["ema"] = load_file(str(path / "ema.safetensors"))
    if "optimizer" in state:
        out["optimizer"] = unflatten_optimizer_state(load_file(str(path / "optimizer.safetensors")),
                                                     state["optimizer"])
    return out


def check_state_dict_matches(model: torch.nn.Module, sd: Dict[str, torch.Tensor], what: str) -> None:
    """Refuse weights for another architecture, naming the first mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    problem = describe_mismatch(what, missing, unexpected, shapes)
    if problem:
        raise CheckpointError(problem)


def describe_mismatch(what: str, missing, unexpected, shapes) -> Optional[str]:
    """One message naming the first missing / unexpected / reshaped keys, or None."""
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {list(missing)[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {list(unexpected)[:3]})")
    if shapes:
        parts.append(f"{len(shapes)} with other shapes (e.g. {list(shapes)[:3]})")
    return f"{what} does not fit this architecture: " + "; ".join(parts)
