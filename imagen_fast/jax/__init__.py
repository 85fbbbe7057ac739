"""The JAX path: Pallas kernels (TPU), the same U-Nets in Flax NNX, weight conversion
from/to the torch cascade checkpoint, a sharded train step and compiled sampling.

Needs the ``jax`` extra (``pip install "imagen-fast[jax]"``, or ``[tpu]`` on a TPU
host). Nothing outside this package imports it, so a torch-only install never loads
JAX. Submodules:

    imagen_fast.jax.ops        group_norm_silu, attention, dynamic_threshold (channels-last)
    imagen_fast.jax.reference  their plain jnp definitions
    imagen_fast.jax.kernels    the Pallas kernels
    imagen_fast.jax.models     the U-Nets in Flax NNX
    imagen_fast.jax.convert    torch state dicts / cascade checkpoints <-> Flax models
    imagen_fast.jax.diffusion  schedules, loss, samplers (one compiled loop)
    imagen_fast.jax.cascade    JaxCascade: a cascade checkpoint sampled stage by stage
    imagen_fast.jax.sharding   device meshes ("data", "fsdp"), parameter sharding, multi-host
    imagen_fast.jax.optim      torch's AdamW, gradient clipping and EMA maths
    imagen_fast.jax.train      the sharded train step and `imagen-fast train --backend jax`
"""
try:
    import jax  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("imagen_fast.jax needs JAX: pip install 'imagen-fast[jax]' "
                      "(or 'imagen-fast[tpu]' on a TPU host)") from e
