"""imagen-fast: Imagen (cascaded text-to-image diffusion) with fast custom kernels."""
__version__ = "0.1.0"

from . import ops  # noqa: E402
from .patch import PatchReport, accelerate, restore  # noqa: E402

__all__ = ["ImagenPipeline", "PatchReport", "accelerate", "load_pipeline", "ops", "restore", "__version__"]


def __getattr__(name):
    # The sampling API loads models and the text stack: imported on first use only.
    if name in ("load_pipeline", "ImagenPipeline"):
        from . import sample
        return getattr(sample, name)
    raise AttributeError(f"module 'imagen_fast' has no attribute {name!r}")
