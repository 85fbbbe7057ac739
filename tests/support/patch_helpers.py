"""Shared checks of the drop-in patch tests: the op-contract tolerance applied to whole
models, and the accelerate / restore invariants."""
import copy

import torch

import imagen_fast
from .numerics import FLOOR, max_err


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert list(after) == list(before), "state_dict keys changed"
    for k, v in before.items():
        assert torch.equal(after[k], v), f"state_dict value {k} changed"


def module_types(model):
    return {name: type(m) for name, m in model.named_modules()}


def patched_pair(model):
    """(original, accelerated deep copy, report)."""
    fast = copy.deepcopy(model)
    report = imagen_fast.accelerate(fast)
    return model, fast, report


def run(model, inputs, grad_out_seed=0):
    """Forward + backward of (out * g).sum(): (out, {name: grad}, [input grads])."""
    model.zero_grad(set_to_none=True)
    leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t
              for t in inputs["args"]]
    out = model(*leaves, **inputs["kwargs"])
    out = out.sample if hasattr(out, "sample") else out
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed),
                    dtype=torch.float64).to(out.dtype)
    (out * g).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    in_grads = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.grad is not None]
    return out.detach(), grads, in_grads


def to64(inputs):
    cast = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return {"args": [cast(t) for t in inputs["args"]],
            "kwargs": {k: cast(v) for k, v in inputs["kwargs"].items()}}


def _check(fast, ref64, torch32, what, factor=3.0, rel_floor=3e-5):
    """fast's error vs the float64 model within factor x the float32 model's error, plus a
    floor relative to the values' scale (sums over many terms round)."""
    assert fast.shape == ref64.shape, what
    assert torch.isfinite(fast).all(), f"{what}: non-finite"
    scale = max(1e-30, ref64.abs().max().item())
    budget = factor * max_err(torch32, ref64) + max(FLOOR[torch.float32], rel_floor * scale)
    err = max_err(fast, ref64)
    assert err <= budget, f"{what}: error {err:.3g} > budget {budget:.3g} (scale {scale:.3g})"


def assert_equivalent(model, inputs, *, check_grads=True):
    """Accelerated float32 model vs the original in float64 (reference) and float32."""
    original, fast, report = patched_pair(model)
    assert report.replaced, "nothing was replaced"
    out32, g32, i32 = run(original, inputs)
    ref = copy.deepcopy(original).double()
    out64, g64, i64 = run(ref, to64(inputs))
    outf, gf, i_f = run(fast, inputs)
    _check(outf, out64, out32, "output")
    if check_grads:
        assert set(gf) == set(g64), "different parameters got gradients"
        for name in g64:
            _check(gf[name], g64[name], g32[name], f"grad {name}")
        for k, (a, r, t) in enumerate(zip(i_f, i64, i32)):
            _check(a, r, t, f"input grad {k}")
    return report
