"""pytest-benchmark regression tracking of the op kernels. Its name does not match
test_*.py, so `pytest tests` leaves it out; run it by path:

    pytest tests/bench/perf_ops.py --benchmark-only [--benchmark-autosave]
"""
import pytest
import torch

from imagen_fast import ops

pytest.importorskip("pytest_benchmark")

GN = [(8, 256, 32, 32), (8, 1024, 8, 8)]


@pytest.mark.parametrize("shape", GN, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_group_norm_silu_forward(benchmark, shape, dtype):
    n, c = shape[:2]
    x = torch.randn(shape, dtype=dtype)
    w, b, s, sh = torch.randn(c), torch.randn(c), torch.randn(n, c), torch.randn(n, c)
    with torch.no_grad():
        benchmark(ops.group_norm_silu, x, 32, w, b, scale=s, shift=sh)


@pytest.mark.parametrize("shape", GN, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu_forward_backward(benchmark, shape):
    n, c = shape[:2]
    x = torch.randn(shape, requires_grad=True)
    params = [torch.randn(c, requires_grad=True), torch.randn(c, requires_grad=True),
              torch.randn(n, c, requires_grad=True), torch.randn(n, c, requires_grad=True)]
    gy = torch.randn(shape)

    def run():
        y = ops.group_norm_silu(x, 32, params[0], params[1], scale=params[2], shift=params[3])
        torch.autograd.grad(y, [x, *params], gy)
    benchmark(run)


def test_attention_text_mask(benchmark):
    q, k, v = torch.randn(8, 8, 256, 64), torch.randn(8, 8, 333, 64), torch.randn(8, 8, 333, 64)
    mask = torch.rand(8, 333) > 0.2
    with torch.no_grad():
        benchmark(ops.attention, q, k, v, mask)


def test_attention_text_mask_forward_backward(benchmark):
    q, k, v = (torch.randn(8, 8, n, 64, requires_grad=True) for n in (256, 333, 333))
    mask = torch.rand(8, 333) > 0.2
    mask[:, 0] = True
    go = torch.randn(8, 8, 256, 64)

    def run():
        torch.autograd.grad(ops.attention(q, k, v, mask), [q, k, v], go)
    benchmark(run)


@pytest.mark.parametrize("shape", [(8, 3, 64, 64), (8, 3, 256, 256)], ids=lambda s: "x".join(map(str, s)))
def test_dynamic_threshold(benchmark, shape):
    x = 2 * torch.randn(shape)
    benchmark(ops.dynamic_threshold, x, 0.995)


def test_sampler_step(benchmark):
    z, c, u, nz = (torch.randn(8, 3, 256, 256) for _ in range(4))
    benchmark(ops.sampler_step, z, c, u, noise=nz, guidance_scale=5.0, alpha_t=0.6, sigma_t=0.8,
              alpha_s=0.8, sigma_s=0.6)
