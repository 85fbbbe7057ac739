"""imagen-fast: Imagen (cascaded text-to-image diffusion) with fast custom kernels."""
__version__ = "0.1.0"

from . import ops  # noqa: E402
from .patch import PatchReport, accelerate, restore  # noqa: E402

__all__ = ["PatchReport", "accelerate", "ops", "restore", "__version__"]
