"""The device and the backends under test."""
import contextlib
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


# The variants of the CPU kernels (imagen_fast/kernels/cpu.py): each cpu test runs on
# both; the avx512 one is skipped only on a CPU without AVX-512 (test_cpu_kernels.py
# checks that it is available wherever the CPU has it).
CPU_ISAS = ("avx512", "portable")


def backends_for_device():
    """Backend names for the `backend` fixture; "cpu-<variant>" runs the cpu backend with
    that variant of its kernels."""
    if DEVICE.type == "cuda":
        return ["torch", "triton", "cuda"]
    return ["torch"] + [f"cpu-{isa}" for isa in CPU_ISAS] + ["triton"]


def require_backend(name: str) -> None:
    """A skip saying why the backend is missing (a failure for "cpu" when CI requires the
    compiled module)."""
    status = backend_available(name)
    if status != "available":
        if name == "cpu" and os.environ.get("IMAGEN_FAST_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"backend cpu unavailable: {status}")
        pytest.skip(f"backend {name}: {status}")


def use_backend_or_skip(name: str):
    """use_backend(name), after require_backend(name)."""
    require_backend(name)
    return dispatch.use_backend(name)


@contextlib.contextmanager
def cpu_isa(name: str):
    """Run the CPU kernels of variant `name` inside the block; skip when this CPU (or
    build) lacks it, fail when CI requires the compiled module and it is missing."""
    require_backend("cpu")
    from imagen_fast.kernels import cpu

    status = cpu.cpu_isas()[name]
    if status != "available":
        pytest.skip(f"cpu kernels {name}: {status}")
    with cpu.use_cpu_isa(name):
        yield name


@contextlib.contextmanager
def use_backend_variant(name: str):
    """use_backend_or_skip(name), where "cpu-<variant>" also picks the kernels' variant.
    Yields the backend's name ("cpu" for the variants)."""
    if name.startswith("cpu-"):
        with cpu_isa(name[len("cpu-"):]), dispatch.use_backend("cpu"):
            yield "cpu"
        return
    with use_backend_or_skip(name):
        yield name


def require_op(backend: str, op: str) -> None:
    """Skip when a backend has no kernel for this op at all (e.g. attention on "cuda")."""
    if (op, backend) not in registry.implementations:
        pytest.skip(f"backend {backend} has no {op} kernel")


def small(backend: str) -> bool:
    """True where shapes must stay tiny (Triton's interpreter is ~4000x slower)."""
    return backend == "triton" and INTERPRETED
