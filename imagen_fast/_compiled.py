"""Loading the compiled module imagen_fast._C, once, with the reason when it fails."""
from __future__ import annotations

import functools
import importlib
import logging

log = logging.getLogger("imagen_fast")
_error: str = ""


@functools.lru_cache(maxsize=None)
def load_extension():
    """imagen_fast._C, or None (logged once) when it was not built."""
    global _error
    try:
        return importlib.import_module("imagen_fast._C")
    except ImportError as e:
        _error = str(e)
        log.warning("imagen_fast._C is not available (%s): CPU ops run on the torch "
                    "reference backend. Reinstall with a C++ compiler and CMake to get "
                    "the compiled kernels.", e)
        return None


def extension_error() -> str:
    load_extension()
    return _error
