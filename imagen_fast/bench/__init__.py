"""Benchmarks: importable scripts; results under benchmarks/results/."""
