"""Shared fixtures: the device, the backends under test, poisoned allocations."""
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

from imagen_fast.kernels import registry  # noqa: E402
from imagen_fast.ops import dispatch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"


def backend_available(name: str) -> str:
    """'available' or why not."""
    return dispatch.available_backends()[name]


def backends_for_device():
    if DEVICE.type == "cuda":
        return ["torch", "triton", "cuda"]
    return ["torch", "cpu", "triton"]


@pytest.fixture(params=backends_for_device())
def backend(request):
    """Runs the test once per backend, inside use_backend(name)."""
    name = request.param
    status = backend_available(name)
    if status != "available":
        if name == "cpu" and os.environ.get("IMAGEN_FAST_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"backend cpu unavailable: {status}")
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
    if (op, backend) not in registry.implementations:
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
