"""Backend selection for the ops.

Each backend registers, per op, an implementation and a ``supports(*tensors)``
predicate that returns None when it can serve the call or a short reason when it
cannot, in the leaf registry ``imagen_fast.kernels.registry``. The kernel backends are
imported on first use (the torch backend with this module). Selection:

* an explicit backend (``use_backend(...)`` or IMAGEN_FAST_BACKEND) must serve the
  call, or a ValueError says why not;
* otherwise the first backend of the device's preference list that can serve it is
  used; falling back past a kernel backend is logged once per (op, reason). On CUDA
  devices, where both triton and cuda can serve an op, which one goes first comes from
  the measured table of ``gpu_choice`` (per op, shape class and GPU architecture).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Callable, Dict, Iterator, Optional

import torch

from ..kernels.registry import BACKENDS, implementations as _registry, mark_unavailable
from ..kernels.registry import unavailable as _unavailable
from . import _torch_backend  # noqa: F401  (always there; the cpu backend defers to it for float64 attention)
from . import gpu_choice

log = logging.getLogger("imagen_fast")

_AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}

_loaded = False
_load_lock = threading.Lock()


class _State(threading.local):
    backend: Optional[str] = None       # use_backend's choice in this thread


_state = _State()
_logged: set = set()

# IMAGEN_FAST_BACKEND is read at every call (it may change while a process runs), from
# os.environ's own dict where CPython has one: os.environ.get raises and catches a KeyError
# when the variable is unset, which costs more than the rest of the backend choice.
ENV = "IMAGEN_FAST_BACKEND"
_env_data = getattr(os.environ, "_data", None)
_env_key = os.environ.encodekey(ENV) if _env_data is not None else None
_env_parsed: Dict[object, Optional[str]] = {}     # raw value -> validated name (valid values only)


def _env_backend() -> Optional[str]:
    if _env_data is not None:
        raw = _env_data.get(_env_key)
        if raw is None:
            return None
    else:
        raw = os.environ.get(ENV)
    name = _env_parsed.get(raw)
    if name is None:
        text = os.environ.decodevalue(raw) if _env_data is not None else raw
        text = text.strip()
        name = _validate_backend_name(text, ENV) if text else "auto"
        _env_parsed[raw] = name
    return name


def _load_backends() -> None:
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if _loaded:
            return
        try:
            from ..kernels import cpu as _cpu_backend  # noqa: F401
        except ImportError as e:
            mark_unavailable("cpu", str(e))
        try:
            from ..kernels import cuda as _cuda_backend  # noqa: F401
        except ImportError as e:
            mark_unavailable("cuda", str(e))
        # Only a missing triton package makes the backend unavailable: an ImportError
        # from inside the kernel modules is a bug and propagates (CI must see it).
        try:
            import triton  # noqa: F401
        except ModuleNotFoundError as e:
            if e.name != "triton":
                raise
            mark_unavailable("triton", "the triton package is not installed")
        else:
            from ..kernels import triton as _triton_backend  # noqa: F401
        _loaded = True


def _validate_backend_name(name: str, what: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"{what} must be one of {BACKENDS + ('auto',)}, got {name!r}")
    return name


def requested_backend() -> Optional[str]:
    """The explicitly requested backend, or None for automatic selection."""
    name = _state.backend
    if name is None:
        name = _env_backend()
    return None if name is None or name == "auto" else name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every op inside the block onto one backend ("auto" restores selection)."""
    name = _validate_backend_name(name, "backend")
    previous = _state.backend
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = previous


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> Dict[str, str]:
    """backend -> "available" or the reason it is not."""
    _load_backends()
    out = {}
    for b in BACKENDS:
        if b in _unavailable:
            out[b] = _unavailable[b]
        elif any(key[1] == b for key in _registry):
            out[b] = "available"
        else:
            out[b] = "no implementations registered"
    return out


def _reason(op: str, backend: str, kind: str, args) -> Optional[str]:
    """None when ``backend`` can run ``op`` on these args (on a device of type ``kind``),
    else why not."""
    if backend in _unavailable:
        return _unavailable[backend]
    impl = _registry.get((op, backend))
    if impl is None:
        return f"backend {backend!r} has no implementation of {op}"
    if backend == "cuda" and kind != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got {kind}"
    if backend == "triton" and kind != "cuda" and not triton_interpreter():
        return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {kind}"
    if backend == "cpu" and kind != "cpu":
        return f"backend 'cpu' needs CPU tensors, got {kind}"
    return impl.supports(*args)


def resolve(op: str, device: torch.device, *args) -> Callable:
    """The implementation of ``op`` for this call (args go to ``supports``)."""
    return _registry[(op, _pick(op, device, args))].fn


_KINDS: Dict[torch.device, str] = {}   # device -> its type: torch.device.type costs more than a dict hit
# (op, device, dtype) -> the Impl of the first backend of the automatic order, remembered
# when that Impl is registered by_dtype and accepted the call; valid while that same Impl
# object is registered and its backend is available (both checked at every hit)
_first_by_dtype: Dict[tuple, object] = {}


def _pick(op: str, device: torch.device, args) -> str:
    """The backend that runs ``op`` for this call."""
    if not _loaded:
        _load_backends()
    kind = _KINDS.get(device)
    if kind is None:
        kind = _KINDS.setdefault(device, device.type)
    wanted = _state.backend or _env_backend()
    if wanted is not None and wanted != "auto":
        why = _reason(op, wanted, kind, args)
        if why is not None:
            raise ValueError(f"{op}: requested backend {wanted!r} cannot run this call: {why}")
        return wanted
    order = _AUTO_ORDER.get(kind, ("torch",))
    first = order[0]
    impl = _registry.get((op, first))
    memo_key = None
    if impl is not None and impl.by_dtype and not (kind == "cuda" and op in gpu_choice.CHOSEN_OPS):
        memo_key = (op, device, args[0].dtype)
        if _first_by_dtype.get(memo_key) is impl and first not in _unavailable:
            return first
    reasons: Dict[str, Optional[str]] = {}
    if kind == "cuda" and op in gpu_choice.CHOSEN_OPS:
        reasons = {b: _reason(op, b, kind, args) for b in gpu_choice.GPU_BACKENDS}
        if all(r is None for r in reasons.values()):
            first = gpu_choice.pick_for_device(op, device, args[0])
            order = (first,) + tuple(b for b in order if b != first)
    skipped = []
    for backend in order:
        why = reasons[backend] if backend in reasons else _reason(op, backend, kind, args)
        if why is None:
            if memo_key is not None and backend == first:
                _first_by_dtype[memo_key] = impl
            if skipped:
                key = (backend, tuple(skipped))
                if key not in _logged:
                    _logged.add(key)
                    log.warning("imagen_fast.%s (and other ops like it): using backend %r (%s)", op, backend,
                                "; ".join(f"{b}: {r}" for b, r in skipped))
            return backend
        skipped.append((backend, why))
    raise ValueError(f"{op}: no backend can run this call: {skipped}")


def resolve_eager(op: str, device: torch.device, *args) -> Optional[Callable]:
    """The differentiable eager implementation ``op`` of the backend that ``resolve`` picks
    for ``op + "_fwd"``, or None when that backend registers none (the custom op runs)."""
    eager = _registry.get((op, _pick(op + "_fwd", device, args)))
    return None if eager is None else eager.fn


def selected_backend(op: str, device: torch.device, *args) -> str:
    """Name of the backend ``resolve`` would pick (for tests, info and benchmarks)."""
    return _pick(op, device, args)
