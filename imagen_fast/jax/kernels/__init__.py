"""Pallas kernels for TPU (Mosaic), one op family per module. Called through
``imagen_fast.jax.ops``, which checks arguments and picks the platform; every kernel
also runs in Pallas' interpreter (``interpret=True``) on any platform."""
