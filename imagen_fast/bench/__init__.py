"""The benchmarks, shipped with the package: ``imagen-fast bench ops|model|all|shapes``, or
``python -m imagen_fast.bench.<module>`` for the others (bench_patch, bench_jax, bench_data).

harness.py holds the timing rules, shapes.py the shape table read off the presets. Every
benchmark writes its results to ``--results-dir`` (default ./bench-results), never into
the installed package; a checkout's committed results are benchmarks/results/, written
when named (``--results-dir benchmarks/results``; ``make bench`` does).
"""
from pathlib import Path

# Where results go unless the user names a directory: relative to the working directory.
DEFAULT_RESULTS = Path("bench-results")
