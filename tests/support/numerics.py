"""The tolerance rule of the op contract, shared by every kernel test.

A kernel's error against the float64 reference may be at most ``factor`` times the
error of PyTorch's own computation in the kernel's dtype (the reference evaluated on
the low-precision inputs), plus a small dtype-dependent floor.
"""
import torch

FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_reference(out, ref64, torch_same_dtype=None, factor=3.0, floor=None,
                              what="output"):
    """out (kernel, any dtype) vs ref64 (float64 reference), relative to torch's own error."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    scale = max(1.0, ref64.abs().max().item())
    floor = FLOOR[out.dtype] * scale if floor is None else floor
    err = max_err(out, ref64)
    budget = floor
    if torch_same_dtype is not None:
        budget += factor * max_err(torch_same_dtype, ref64)
    assert err <= budget, f"{what}: max error {err:.3g} > budget {budget:.3g} ({out.dtype})"


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, generator=None):
    """Fresh random inputs (never zeros), made in float64 then cast."""
    return (torch.randn(*shape, dtype=torch.float64, generator=generator) * scale).to(
        device=device, dtype=dtype)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def group_norm_inputs(shape, dtype, film=True, affine=True, seed=0):
    """x (shifted off zero), weight, bias (C,) and FiLM scale, shift (N, C); params float32."""
    g = gen(seed)
    n, c = shape[:2]
    x = randn(*shape, dtype=dtype, generator=g, scale=2.0) + 0.5
    w = randn(c, generator=g) if affine else None
    b = randn(c, generator=g) if affine else None
    s = randn(n, c, generator=g, scale=0.5) if film else None
    sh = randn(n, c, generator=g, scale=0.5) if film else None
    return x, w, b, s, sh
