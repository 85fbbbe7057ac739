"""Backend "cuda": the CUDA C++ kernels of csrc/cuda, through imagen_fast._C.

Tensors cross as data pointers, shapes and the current torch CUDA stream. The
module raises ImportError (and the backend is reported unavailable) when _C was
built without CUDA.
"""
from __future__ import annotations

from .._compiled import load_extension

_C = load_extension()
if _C is None:
    raise ImportError("imagen_fast._C is not available")
if not _C.HAS_CUDA:
    raise ImportError("imagen_fast._C was built without CUDA (no nvcc at build time, "
                      "or IMAGEN_FAST_CUDA=0)")
