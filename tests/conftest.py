"""Fixtures and hooks only (shared helpers live in tests/support/): the environment, the
backends under test, poisoned allocations, the slow and gpu markers."""
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

from support.device import backends_for_device, use_backend_or_skip  # noqa: E402


@pytest.fixture(params=backends_for_device())
def backend(request):
    """Runs the test once per backend, inside use_backend(name)."""
    with use_backend_or_skip(request.param):
        yield request.param


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


def pytest_collection_modifyitems(config, items):
    """@pytest.mark.slow tests run only with IMAGEN_FAST_SLOW=1; @pytest.mark.gpu tests
    only where CUDA is available."""
    slow = os.environ.get("IMAGEN_FAST_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow: set IMAGEN_FAST_SLOW=1 to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
