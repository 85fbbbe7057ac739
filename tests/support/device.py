"""The device and the backends under test."""
import os

import pytest
import torch

from imagen_fast.kernels import registry
from imagen_fast.ops import dispatch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"     # triton runs in its interpreter (TRITON_INTERPRET=1)


def backend_available(name: str) -> str:
    """'available' or why not."""
    return dispatch.available_backends()[name]


def backends_for_device():
    if DEVICE.type == "cuda":
        return ["torch", "triton", "cuda"]
    return ["torch", "cpu", "triton"]


def use_backend_or_skip(name: str):
    """use_backend(name), or a skip saying why the backend is missing (a failure for
    "cpu" when CI requires the compiled module)."""
    status = backend_available(name)
    if status != "available":
        if name == "cpu" and os.environ.get("IMAGEN_FAST_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"backend cpu unavailable: {status}")
        pytest.skip(f"backend {name}: {status}")
    return dispatch.use_backend(name)


def require_op(backend: str, op: str) -> None:
    """Skip when a backend has no kernel for this op at all (e.g. attention on "cuda")."""
    if (op, backend) not in registry.implementations:
        pytest.skip(f"backend {backend} has no {op} kernel")


def small(backend: str) -> bool:
    """True where shapes must stay tiny (Triton's interpreter is ~4000x slower)."""
    return backend == "triton" and INTERPRETED
