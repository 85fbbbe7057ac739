"""Backend "triton": Triton kernels for every op (CUDA GPUs; CPU tensors under
TRITON_INTERPRET=1). Importing this package registers them with the dispatcher;
an ImportError (no triton) marks the backend unavailable.
"""
import triton  # noqa: F401  (ImportError -> backend unavailable)

from . import attention, group_norm, threshold  # noqa: F401,E402

__all__ = ["attention", "group_norm", "threshold"]
