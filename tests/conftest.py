"""Shared fixtures: the device, the backends under test, poisoned allocations."""
import contextlib
import os

import pytest
import torch

# The JAX tests run on the CPU (Pallas kernels in interpret mode, TPU lowering
# checked by jax.export): never let a GPU build of jaxlib pick another platform.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Test models are tiny: compile time dominates, so skip LLVM's heavy optimisations.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

# Without a GPU the triton backend runs in Triton's interpreter on CPU tensors. This
# must be set before any @triton.jit function is defined, so before imagen_fast's
# triton kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from imagen_fast.ops import dispatch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"


def backend_available(name: str) -> str:
    """'available' or why not."""
    return dispatch.available_backends()[name]


# The variants of the CPU kernels (imagen_fast/ops/_cpu_backend.py): each cpu test runs
# on both; the avx512 one is skipped only on a CPU without AVX-512 (test_cpu_kernels.py
# checks that it is available wherever the CPU has it).
CPU_ISAS = ("avx512", "portable")


def backends_for_device():
    if DEVICE.type == "cuda":
        return ["torch", "triton", "cuda"]
    return ["torch"] + [f"cpu-{isa}" for isa in CPU_ISAS] + ["triton"]


def _require_cpu_backend():
    status = backend_available("cpu")
    if status != "available":
        if os.environ.get("IMAGEN_FAST_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"backend cpu unavailable: {status}")
        pytest.skip(f"backend cpu: {status}")


@contextlib.contextmanager
def cpu_isa(name: str):
    """Run the CPU kernels of variant `name` inside the block; skip when this CPU (or
    build) lacks it."""
    _require_cpu_backend()
    from imagen_fast.ops import _cpu_backend

    status = _cpu_backend.cpu_isas()[name]
    if status != "available":
        pytest.skip(f"cpu kernels {name}: {status}")
    with _cpu_backend.use_cpu_isa(name):
        yield name


@pytest.fixture(params=backends_for_device())
def backend(request):
    """Runs the test once per backend, inside use_backend(name); the cpu backend once per
    variant of its kernels (param cpu-avx512 / cpu-portable, yielding "cpu")."""
    name = request.param
    if name.startswith("cpu-"):
        with cpu_isa(name[len("cpu-"):]), dispatch.use_backend("cpu"):
            yield "cpu"
        return
    status = backend_available(name)
    if status != "available":
        pytest.skip(f"backend {name}: {status}")
    with dispatch.use_backend(name):
        yield name


@pytest.fixture
def poison(monkeypatch):
    """Make torch.empty/empty_like return NaN-filled memory, to catch unwritten outputs."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))
    yield


def require_op(backend: str, op: str) -> None:
    """Skip when a backend has no kernel for this op at all (e.g. attention on "cuda")."""
    if (op, backend) not in dispatch._registry:
        pytest.skip(f"backend {backend} has no {op} kernel")


def small(backend: str) -> bool:
    """True where shapes must stay tiny (Triton's interpreter is ~4000x slower)."""
    return backend == "triton" and INTERPRETED


def pytest_collection_modifyitems(config, items):
    """@pytest.mark.slow tests run only with IMAGEN_FAST_SLOW=1."""
    if os.environ.get("IMAGEN_FAST_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set IMAGEN_FAST_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
