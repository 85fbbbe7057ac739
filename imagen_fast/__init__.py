"""imagen-fast: Imagen (cascaded text-to-image diffusion) with fast custom kernels."""
__version__ = "0.1.0"

from . import ops  # noqa: E402
from .patch import PatchReport, accelerate, restore  # noqa: E402

__all__ = ["ImagenCascade", "ImagenPipeline", "PatchReport", "accelerate", "load_pipeline", "ops", "restore",
           "__version__"]

# The cascade and the sampling pipeline load models and the text stack: imported on first use.
_LAZY = {"load_pipeline": "pipeline", "ImagenPipeline": "pipeline", "ImagenCascade": "cascade"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'imagen_fast' has no attribute {name!r}")
