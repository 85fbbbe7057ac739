"""The backends below the op API (imagen_fast.ops), one op family per file per backend:

    registry.py   (op, backend) -> implementation; a leaf the backends register into
    layout.py     layout and dtype rules every backend shares (a leaf)
    cpu.py        backend "cpu": csrc/cpu through imagen_fast._C
    cuda.py       backend "cuda": csrc/cuda through imagen_fast._C
    triton/       backend "triton": Triton kernels

Nothing here imports imagen_fast.ops (tests/ops/test_layering.py checks it): the op API
imports these modules when it first selects a backend, and they register themselves.
"""
