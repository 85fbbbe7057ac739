"""The backend registry: which function implements each op key on each backend.

A leaf: it imports nothing of imagen_fast. The kernels (imagen_fast/kernels/*) register
themselves here, and the op API above them (imagen_fast/ops/dispatch.py) reads it to
pick a backend, so neither layer imports the other the wrong way.

Op keys have one form: the public op's name (``imagen_fast.ops.<name>``), with ``_fwd``
/ ``_bwd`` for the ops that have a backward pass. Such an op's bare name (``attention``) is
the key of a backend's optional eager path: a differentiable function that
``imagen_fast.ops`` calls outside torch.compile instead of the custom op and its Python
autograd (``dispatch.resolve_eager``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

BACKENDS = ("triton", "cuda", "cpu", "torch")
OPS = (
    "group_norm_silu_fwd", "group_norm_silu_bwd",
    "channel_rms_norm_silu_fwd", "channel_rms_norm_silu_bwd",
    "attention_fwd", "attention_bwd", "attention",
    "dynamic_threshold", "sampler_step",
)


@dataclass(frozen=True)
class Impl:
    fn: Callable
    supports: Callable[..., Optional[str]]
    # supports' answer depends on nothing but the first tensor's device and dtype, for
    # calls whose tensors the op layer has checked to share both and, where supports
    # looks at layouts, brought into one kernel layout (the automatic choice is then
    # remembered per (op, device, dtype): imagen_fast.ops.dispatch)
    by_dtype: bool = False


implementations: Dict[Tuple[str, str], Impl] = {}   # (op, backend) -> Impl
unavailable: Dict[str, str] = {}                    # backend -> why it could not load


def register(op: str, backend: str, supports: Optional[Callable[..., Optional[str]]] = None,
             by_dtype: bool = False):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``.

    ``supports(*tensors)`` returns None when the backend can serve a call, else a
    one-line reason (shown in the fallback log and in the error when the backend was
    asked for explicitly); ``by_dtype``: see Impl."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn):
        implementations[(op, backend)] = Impl(fn, supports or (lambda *a, **k: None), by_dtype)
        return fn

    return deco


def mark_unavailable(backend: str, reason: str) -> None:
    unavailable[backend] = reason


def implementation(op: str, backend: str) -> Callable:
    """The registered function of (op, backend); LookupError when there is none."""
    impl = implementations.get((op, backend))
    if impl is None:
        raise LookupError(f"backend {backend!r} has no registered implementation of {op}")
    return impl.fn
