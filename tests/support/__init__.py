"""Helpers shared by the test modules (conftest.py holds only fixtures and hooks):

    device.py         the device and backends under test
    numerics.py       the tolerance rule against float64 references, random inputs
    eval_helpers.py   offline stand-ins: a tiny cascade, COCO folder, Inception, CLIP
    patch_helpers.py  the drop-in patches' equivalence checks
    jax_util.py       torch <-> JAX conversion (skips the module without JAX)
"""
