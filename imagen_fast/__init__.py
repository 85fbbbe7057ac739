"""imagen-fast: Imagen (cascaded text-to-image diffusion) with fast custom kernels."""
__version__ = "0.1.0"

from . import ops  # noqa: E402

__all__ = ["ops", "__version__"]
