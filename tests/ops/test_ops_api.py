"""The op API itself: argument checks, backend selection, torch.library integration."""
import itertools
import logging
import os
import shutil

import pytest
import torch

from support.device import DEVICE
from imagen_fast import ops
from imagen_fast.kernels import registry
from imagen_fast.ops import dispatch

x4 = torch.randn(2, 8, 4, 4)
q4 = torch.randn(2, 2, 5, 8)
k4 = torch.randn(2, 2, 7, 8)
m2 = torch.ones(2, 7, dtype=torch.bool)

BAD_CALLS = [
    # (call, exception, words the message must contain)
    (lambda: ops.group_norm_silu([1.0], 2), TypeError, "x must be a torch.Tensor"),
    (lambda: ops.group_norm_silu(torch.randn(8), 2), ValueError, "x must have at least 2 dims"),
    (lambda: ops.group_norm_silu(x4.int(), 2), TypeError, "x must have dtype"),
    (lambda: ops.group_norm_silu(x4, 3), ValueError, "num_groups must be a positive divisor of C=8"),
    (lambda: ops.group_norm_silu(x4, 0), ValueError, "num_groups"),
    (lambda: ops.group_norm_silu(x4, 2.0), TypeError, "num_groups must be an int"),
    (lambda: ops.group_norm_silu(x4, 2, weight=torch.randn(4)), ValueError, "weight must have shape (C,)"),
    (lambda: ops.group_norm_silu(x4, 2, bias=torch.randn(8, 1)), ValueError, "bias must have shape"),
    (lambda: ops.group_norm_silu(x4, 2, scale=torch.randn(3, 8)), ValueError, "scale must have shape (N, C)"),
    (lambda: ops.group_norm_silu(x4, 2, shift=torch.randn(2, 8, 2)), ValueError, "shift must have shape"),
    (lambda: ops.group_norm_silu(x4, 2, eps=0.0), ValueError, "eps must be > 0"),
    (lambda: ops.group_norm_silu(x4, 2, eps=float("nan")), ValueError, "eps must be finite"),
    (lambda: ops.group_norm_silu(x4, 2, activation="relu"), ValueError, "activation must be"),
    (lambda: ops.group_norm_silu(torch.randn(0, 8, 2, 2), 2), ValueError, "x must not be empty"),
    (lambda: ops.channel_rms_norm_silu([1.0]), TypeError, "x must be a torch.Tensor"),
    (lambda: ops.channel_rms_norm_silu(torch.randn(8)), ValueError, "x must have at least 2 dims"),
    (lambda: ops.channel_rms_norm_silu(x4, torch.randn(4)), ValueError, "weight must have shape (C,)"),
    (lambda: ops.channel_rms_norm_silu(x4, scale=torch.randn(3, 8)), ValueError, "scale must have shape"),
    (lambda: ops.channel_rms_norm_silu(x4, shift=torch.randn(2, 8, 2)), ValueError, "shift must have shape"),
    (lambda: ops.channel_rms_norm_silu(x4, eps=-1.0), ValueError, "eps must be > 0"),
    (lambda: ops.channel_rms_norm_silu(x4, activation="tanh"), ValueError, "activation must be"),
    (lambda: ops.channel_rms_norm_silu(torch.randn(2, 0, 3)), ValueError, "x must not be empty"),
    (lambda: ops.dynamic_threshold(x4, 0.9, max_value=0.0), ValueError, "max_value must be > 0"),
    (lambda: ops.dynamic_threshold(x4, 0.9, max_value="1"), TypeError, "max_value must be a float"),
    (lambda: ops.attention(q4[0], k4, k4), ValueError, "q must have 4 dims"),
    (lambda: ops.attention(q4, k4.double(), k4), TypeError, "k must have q's dtype"),
    (lambda: ops.attention(q4, torch.randn(2, 2, 7, 4), torch.randn(2, 2, 7, 4)), ValueError,
     "k must have shape (B, H, Lk, D)"),
    (lambda: ops.attention(q4, k4, torch.randn(2, 2, 6, 8)), ValueError, "v must have k's shape"),
    (lambda: ops.attention(q4, k4, k4, m2.float()), TypeError, "key_padding_mask must have dtype"),
    (lambda: ops.attention(q4, k4, k4, m2[:, :5]), ValueError, "key_padding_mask must have shape (B, Lk)"),
    (lambda: ops.attention(q4, k4, k4, scale=-1.0), ValueError, "scale must be > 0"),
    (lambda: ops.dynamic_threshold(x4, 99.5), ValueError, "percentile must be a fraction in [0, 1]"),
    (lambda: ops.dynamic_threshold(x4, float("nan")), ValueError, "percentile must be finite"),
    (lambda: ops.dynamic_threshold(x4, 0.9, min_value=0.0), ValueError, "min_value must be > 0"),
    (lambda: ops.dynamic_threshold(torch.randn(5), 0.9), ValueError, "x0 must have at least 2 dims"),
    (lambda: ops.dynamic_threshold(x4.long(), 0.9), TypeError, "x0 must have dtype"),
    (lambda: ops.sampler_step(x4, x4[:1], alpha_t=0.6, sigma_t=0.8, alpha_s=0.8, sigma_s=0.6),
     ValueError, "pred_cond must have z_t's shape"),
    (lambda: ops.sampler_step(x4, x4, x4.half(), alpha_t=0.6, sigma_t=0.8, alpha_s=0.8, sigma_s=0.6),
     TypeError, "pred_uncond must have z_t's dtype"),
    (lambda: ops.sampler_step(x4, x4, alpha_t=0.6, sigma_t=0.8, alpha_s=0.8, sigma_s=0.6,
                              threshold="soft"), ValueError, "threshold must be one of"),
    (lambda: ops.sampler_step(x4, x4, alpha_t=0.6, sigma_t=0.8, alpha_s=0.8, sigma_s=0.6,
                              sampler="euler"), ValueError, "sampler must be one of"),
    (lambda: ops.sampler_step(x4, x4, alpha_t=0.6, sigma_t=0.8, alpha_s=0.8, sigma_s=0.6,
                              prediction="x"), ValueError, "prediction must be one of"),
    (lambda: ops.sampler_step(x4, x4, alpha_t=torch.ones(3), sigma_t=0.8, alpha_s=0.8, sigma_s=0.6),
     ValueError, "alpha_t must be a float or a tensor of shape (N,)"),
    (lambda: ops.sampler_step(x4, x4, alpha_t=0.0, sigma_t=0.8, alpha_s=0.8, sigma_s=0.6),
     ValueError, "alpha_t and sigma_t must be > 0"),
    (lambda: ops.sampler_step(x4, x4, alpha_t=0.6, sigma_t=0.8, alpha_s=0.8, sigma_s=0.6,
                              eta=2.0), ValueError, "eta must be <= 1"),
    (lambda: ops.sampler_step(x4, x4, guidance_scale=float("inf"), alpha_t=0.6, sigma_t=0.8,
                              alpha_s=0.8, sigma_s=0.6), ValueError, "guidance_scale must be finite"),
    (lambda: ops.sampler_step(x4, x4, alpha_t=0.6, sigma_t=0.8, alpha_s=0.8, sigma_s=0.6,
                              noise=x4[:, :1]), ValueError, "noise must have z_t's shape"),
]


@pytest.mark.parametrize("call,exc,words", BAD_CALLS, ids=[w for _, _, w in BAD_CALLS])
def test_bad_input_names_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    assert words in str(info.value)


@pytest.mark.gpu                       # a second device
def test_mismatched_devices():
    with pytest.raises(ValueError, match="weight is on"):
        ops.group_norm_silu(x4.cuda(), 2, weight=torch.randn(8))


# ------------------------------------------------------------------ backend choice
def test_use_backend_and_env(monkeypatch):
    with ops.use_backend("torch"):
        assert ops.requested_backend() == "torch"
        assert dispatch.selected_backend("dynamic_threshold", x4.device, x4) == "torch"
    assert ops.requested_backend() is None
    monkeypatch.setenv("IMAGEN_FAST_BACKEND", "torch")
    assert ops.requested_backend() == "torch"
    monkeypatch.setenv("IMAGEN_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="IMAGEN_FAST_BACKEND must be one of"):
        ops.requested_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("tpu"):
            pass


def test_explicit_backend_that_cannot_serve_raises():
    if DEVICE.type == "cuda":
        pytest.skip("CPU-tensor check")
    with ops.use_backend("cuda"):
        with pytest.raises(ValueError, match="requested backend 'cuda' cannot run this call"):
            ops.dynamic_threshold(x4, 0.9)


def test_auto_selection_prefers_compiled_kernels_on_cpu():
    status = ops.available_backends()
    expected = "cpu" if status["cpu"] == "available" else "torch"
    assert dispatch.selected_backend("group_norm_silu_fwd", x4.device, x4) == expected


def test_fallback_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setitem(registry.unavailable, "cpu", "pretend it was not built")
    with caplog.at_level(logging.WARNING, logger="imagen_fast"):
        ops.dynamic_threshold(x4, 0.9)
        ops.dynamic_threshold(x4, 0.9)
    msgs = [r.getMessage() for r in caplog.records if "pretend it was not built" in r.getMessage()]
    assert len(msgs) == 1 and "using backend 'torch'" in msgs[0]


def test_choice_remembered_by_dtype_follows_the_registry(monkeypatch):
    """attention_fwd's cpu implementation is registered by_dtype: the automatic choice is
    remembered per (op, device, dtype), and a backend that becomes unavailable or an
    implementation replaced in the registry is seen at the next call."""
    if ops.available_backends()["cpu"] != "available":
        pytest.skip("the cpu backend is not built")
    monkeypatch.setattr(dispatch, "_first_by_dtype", {})
    monkeypatch.setattr(dispatch, "_logged", set())
    q = torch.randn(1, 2, 3, 4)
    cpu_impl = registry.implementations[("attention_fwd", "cpu")]
    assert cpu_impl.by_dtype
    for _ in range(2):
        assert dispatch.selected_backend("attention_fwd", q.device, q, q, q, None) == "cpu"
    assert dispatch._first_by_dtype == {("attention_fwd", q.device, torch.float32): cpu_impl}
    assert dispatch.selected_backend("attention_fwd", q.device, *(q.double(),) * 3, None) == "cpu"
    assert len(dispatch._first_by_dtype) == 2
    monkeypatch.setitem(registry.unavailable, "cpu", "pretend it was not built")
    assert dispatch.selected_backend("attention_fwd", q.device, q, q, q, None) == "torch"
    monkeypatch.delitem(registry.unavailable, "cpu")
    refuses = registry.Impl(cpu_impl.fn, lambda *a: "pretend it refuses", True)
    monkeypatch.setitem(registry.implementations, ("attention_fwd", "cpu"), refuses)
    assert dispatch.selected_backend("attention_fwd", q.device, q, q, q, None) == "torch"
    with ops.use_backend("cpu"), pytest.raises(ValueError, match="pretend it refuses"):
        dispatch.selected_backend("attention_fwd", q.device, q, q, q, None)


def test_remembered_choice_keeps_layouts_right(monkeypatch):
    """dynamic_threshold, sampler_step and the norms' cpu implementations are registered
    by_dtype: once the choice is remembered, calls in every mix of layouts still match
    the torch backend, since the op layer brings the tensors into one kernel layout first."""
    if ops.available_backends()["cpu"] != "available":
        pytest.skip("the cpu backend is not built")
    monkeypatch.setattr(dispatch, "_first_by_dtype", {})
    for op in ("dynamic_threshold", "sampler_step", "group_norm_silu_fwd", "group_norm_silu_bwd",
               "channel_rms_norm_silu_fwd", "channel_rms_norm_silu_bwd"):
        assert registry.implementations[(op, "cpu")].by_dtype
    g = torch.Generator().manual_seed(7)
    z, pc, pu, nz = (torch.randn(2, 3, 5, 6, generator=g) for _ in range(4))
    row = torch.tensor([0.9, 0.3, 0.6, 0.35, 0.05], dtype=torch.float64)
    variants = [lambda t: t, lambda t: t.contiguous(memory_format=torch.channels_last),
                lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)]
    for i, (fz, fc) in enumerate(itertools.product(variants, repeat=2)):
        args = (fz(z), fc(pc), fz(pu))
        out = ops.sampler_step(*args, guidance_scale=2.5, coefs=row, noise=fc(nz))
        thr = ops.dynamic_threshold(fc(pc * 3))
        assert {("sampler_step", z.device, torch.float32),
                ("dynamic_threshold", z.device, torch.float32)} <= set(dispatch._first_by_dtype)
        with ops.use_backend("torch"):
            ref = ops.sampler_step(*args, guidance_scale=2.5, coefs=row, noise=fc(nz))
            ref_thr = ops.dynamic_threshold(fc(pc * 3))
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, msg=f"layout mix {i}")
        torch.testing.assert_close(thr, ref_thr, rtol=1e-6, atol=1e-6, msg=f"layout mix {i}")
    # the norms (also by_dtype): every layout, forward and backward
    x = torch.randn(2, 8, 5, 6, generator=g)
    w, sc, sh = torch.randn(8, generator=g), torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    for i, f in enumerate(variants):
        for name, call in (("group_norm_silu", lambda t: ops.group_norm_silu(t, 4, w, None, scale=sc, shift=sh)),
                           ("channel_rms_norm_silu", lambda t: ops.channel_rms_norm_silu(t, w, scale=sc, shift=sh))):
            xi = f(x).requires_grad_()
            y = call(xi)
            (gx,) = torch.autograd.grad(y, xi, f(x.cos()))
            assert (name + "_fwd", x.device, torch.float32) in dispatch._first_by_dtype
            assert (name + "_bwd", x.device, torch.float32) in dispatch._first_by_dtype
            with ops.use_backend("torch"):
                xr = f(x).requires_grad_()
                yr = call(xr)
                (gr,) = torch.autograd.grad(yr, xr, f(x.cos()))
            torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5, msg=f"{name} layout {i}")
            torch.testing.assert_close(gx, gr, rtol=1e-4, atol=1e-4, msg=f"{name} grad layout {i}")


_BACKENDS_PROBE = """
import sys
for name in sys.argv[1:]:
    sys.modules[name] = None          # importing it now raises ImportError
from imagen_fast.ops import dispatch
try:
    status = dispatch.available_backends()["triton"]
except ImportError as e:
    print("RAISED", type(e).__name__, e)
else:
    print("STATUS", status)
"""


def _probe_backends(*blocked):
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    r = subprocess.run([sys.executable, "-c", _BACKENDS_PROBE, *blocked], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def test_only_a_missing_triton_package_marks_the_backend_unavailable():
    """A broken kernel module must fail loudly (CI sees it), never pass as 'triton
    unavailable' with the triton tests skipped; without the triton package the
    backend is unavailable and says why."""
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        pytest.skip("the triton package is not installed")
    assert _probe_backends() == "STATUS available"
    assert dispatch.available_backends()["triton"] == "available"
    out = _probe_backends("imagen_fast.kernels.triton.threshold")
    assert out.startswith("RAISED") and "threshold" in out
    assert _probe_backends("triton") == "STATUS the triton package is not installed"


def test_compiled_module_built_with_cuda_when_nvcc_present():
    """CI compiles csrc/cuda whenever nvcc is there: a CUDA compile error fails the build."""
    from imagen_fast._compiled import load_extension

    C = load_extension()
    if C is None:
        pytest.skip("imagen_fast._C not built")
    nvcc = shutil.which("nvcc") or os.path.exists(os.path.join(
        os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    if nvcc and os.environ.get("IMAGEN_FAST_CUDA") != "0":
        info = C.build_info()
        assert info["cuda"] and "80" in info["cuda_archs"] and "90a" in info["cuda_archs"]
        assert C.cuda_device_count() == torch.cuda.device_count()


# ------------------------------------------------------------- torch.library / compile
def test_opcheck():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    s = torch.randn(2, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.imagen_fast.group_norm_silu_fwd.default,
                          (x, 2, w, None, 1e-5, s, None, "silu"))
    q = torch.randn(2, 2, 5, 8, requires_grad=True)
    k = torch.randn(2, 2, 6, 8, requires_grad=True)
    v = torch.randn(2, 2, 6, 8, requires_grad=True)
    mask = torch.rand(2, 6) > 0.3
    mask[:, 0] = True
    torch.library.opcheck(torch.ops.imagen_fast.attention_fwd.default, (q, k, v, mask, 0.35))
    torch.library.opcheck(torch.ops.imagen_fast.dynamic_threshold.default,
                          (x.detach(), 0.9, 1.0, 1.5))
    torch.library.opcheck(torch.ops.imagen_fast.channel_rms_norm_silu_fwd.default,
                          (x, w, 1e-6, s, None, "gelu"))


class _Block(torch.nn.Module):
    """A tiny residual block with text attention, built only from the ops."""

    def __init__(self, c=8, d=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.weight = torch.nn.Parameter(torch.randn(c))
        self.bias = torch.nn.Parameter(torch.randn(c))
        self.film = torch.nn.Linear(d, 2 * c)
        self.qkv = torch.nn.Linear(c, 3 * c)

    def forward(self, x, emb, text, mask):
        scale, shift = self.film(emb).chunk(2, dim=1)
        h = ops.group_norm_silu(x, 4, self.weight, self.bias, scale=scale, shift=shift)
        h = self.conv(h)
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).reshape(b, -1, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        k = torch.cat([text, k], dim=2)
        v = torch.cat([text, v], dim=2)
        full_mask = torch.cat([mask, torch.ones(b, hh * ww, dtype=torch.bool)], dim=1)
        a = ops.attention(q, k, v, full_mask)
        return x + a.transpose(1, 2).reshape(b, hh * ww, c).transpose(1, 2).reshape(b, c, hh, ww)


def test_torch_compile_fullgraph_no_graph_break():
    torch.manual_seed(0)
    block = _Block()
    args = (torch.randn(2, 8, 4, 4), torch.randn(2, 8), torch.randn(2, 2, 3, 4),
            torch.tensor([[True, True, False], [False, False, False]]))
    eager = block(*args)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.sum().backward()            # backward through the registered autograd
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())
    explanation = torch._dynamo.explain(block)(*args)
    assert explanation.graph_break_count == 0


def test_torch_compile_inductor_runs_the_custom_ops():
    torch._dynamo.reset()
    f = torch.compile(lambda x, s: ops.dynamic_threshold(ops.group_norm_silu(x, 2, scale=s) * 3, 0.9),
                      fullgraph=True)
    x, s = torch.randn(2, 4, 5, 5), torch.randn(2, 4)
    torch.testing.assert_close(f(x, s), ops.dynamic_threshold(ops.group_norm_silu(x, 2, scale=s) * 3, 0.9))


def test_torch_export_sees_the_ops():
    class M(torch.nn.Module):
        def forward(self, x):
            return ops.group_norm_silu(x, 2)

    ep = torch.export.export(M(), (torch.randn(2, 4, 3, 3),))
    assert "imagen_fast.group_norm_silu_fwd" in str(ep.graph)


def test_torch_compile_channel_rms_norm_fullgraph():
    """Forward and backward of channel_rms_norm_silu under torch.compile, no graph break."""
    torch._dynamo.reset()
    x = torch.randn(2, 6, 4, 5, requires_grad=True)
    w, s, sh = torch.randn(6, requires_grad=True), torch.randn(2, 6), torch.randn(2, 6)
    f = lambda x, w: ops.channel_rms_norm_silu(x, w, 1e-6, s, sh) * 2  # noqa: E731
    eager = f(x, w)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w)
    torch.testing.assert_close(compiled, eager)
    ge = torch.autograd.grad(eager.sum(), [x, w])
    gc = torch.autograd.grad(compiled.sum(), [x, w])
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_compiled_backward_through_strided_attention_inputs():
    """q/k/v as strided views of one projection: the compiled backward must agree with eager."""
    torch._dynamo.reset()
    proj = torch.randn(2, 6, 3 * 16, requires_grad=True)
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])

    def f(p):
        q, k, v = p.reshape(2, 6, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return ops.attention(q, k, v, mask).square().sum()

    (g_eager,) = torch.autograd.grad(f(proj), [proj])
    (g_comp,) = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(proj), [proj])
    torch.testing.assert_close(g_comp, g_eager)


# ------------------------------------------------------------------ eager fast path
# In eager mode the ops run their backend's function directly (ops/api.py: _eager); with
# custom_ops_only() every call goes through the custom op, as torch.compile's graphs do.
def _raised(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the exception itself is compared
        return type(e), str(e)
    return None


@pytest.mark.parametrize("call,exc,words", BAD_CALLS, ids=[w for _, _, w in BAD_CALLS])
def test_fast_path_raises_as_the_custom_op(call, exc, words):
    eager = _raised(call)
    with ops.api.custom_ops_only():
        assert _raised(call) == eager
    assert eager is not None and eager[0] is exc


def test_fast_path_backend_errors_as_the_custom_op():
    if DEVICE.type == "cuda":
        pytest.skip("CPU-tensor check")
    calls = [lambda: ops.group_norm_silu(x4, 2), lambda: ops.channel_rms_norm_silu(x4),
             lambda: ops.dynamic_threshold(x4, 0.9),
             lambda: ops.sampler_step(x4, x4, alpha_t=0.6, sigma_t=0.8, alpha_s=0.8, sigma_s=0.6)]
    for call in calls:
        with ops.use_backend("cuda"):
            eager = _raised(call)
            with ops.api.custom_ops_only():
                assert _raised(call) == eager
        assert eager[0] is ValueError and "requested backend 'cuda' cannot run this call" in eager[1]


def _fast_and_custom(fn, leaves):
    """fn()'s output and the gradients of its inputs (from a fixed output gradient), on the
    eager fast path and through the custom ops."""
    out = []
    for custom in (False, True):
        inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        with ops.api.custom_ops_only() if custom else torch.enable_grad():
            y = fn(*inputs)
            wanted = [t for t in inputs if t.requires_grad]
            grads = torch.autograd.grad(y, wanted, torch.linspace(-1, 1, y.numel()).reshape(y.shape)) if wanted else []
        out.append((y.detach(), grads))
    return out


def _same(a, b, exact=True):
    check = (lambda x, y: torch.equal(x, y)) if exact else (  # noqa: E731
        lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-6))
    assert check(a[0], b[0])
    assert len(a[1]) == len(b[1]) and all(check(g, h) for g, h in zip(a[1], b[1]))


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_fast_path_matches_the_custom_op(backend, grad):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_(grad)  # noqa: E731
    x, w, b, s, sh = r(2, 6, 5, 3), r(6), r(6), r(2, 6), r(2, 6, 1, 1)
    xcl = r(2, 6, 4, 5).contiguous(memory_format=torch.channels_last)
    q, k, v = r(2, 2, 3, 8), r(2, 2, 7, 8), r(2, 2, 7, 8)
    mask = torch.tensor([[True] * 7, [True, False, True] + [False] * 4], device=DEVICE)
    cases = [
        (lambda x, w, b, s, sh: ops.group_norm_silu(x, 3, w, b, 1e-5, s, sh), [x, w, b, s, sh]),
        (lambda x, w: ops.group_norm_silu(x.half(), 2, w, activation="gelu").float(), [xcl, w]),
        (lambda x, w, s, sh: ops.channel_rms_norm_silu(x, w, 1e-6, s, sh), [x, w, s, sh]),
        (lambda x: ops.channel_rms_norm_silu(x, activation=None), [xcl]),
        (lambda q, k, v: ops.attention(q, k, v, mask), [q, k, v]),
        (lambda x: ops.dynamic_threshold(x * 3, 0.9), [x.detach()]),
    ]
    with ops.use_backend(backend):
        for i, (fn, leaves) in enumerate(cases):
            # attention on the cpu backend: eager mode runs SDPA with its autograd, the custom
            # op the backend's own kernels (small-query / flash with the log-sum-exp)
            exact = not (i == 4 and ops.dispatch.selected_backend("attention_fwd", q.device, q, k, v, mask) == "cpu")
            _same(*_fast_and_custom(fn, leaves), exact=exact)
        z, c, u = (t.detach() for t in (x, r(2, 6, 5, 3), r(2, 6, 5, 3)))
        for times in (dict(alpha_t=0.6, sigma_t=0.8, alpha_s=0.8, sigma_s=0.6),
                      dict(alpha_t=torch.tensor([0.6, 0.7]), sigma_t=torch.tensor([0.8, 0.71414284]),
                           alpha_s=0.8, sigma_s=0.6)):
            step = lambda: ops.sampler_step(z, c, u, guidance_scale=4.0, generator=torch.Generator().manual_seed(1),  # noqa: E731
                                            **times)
            eager = step()
            with ops.api.custom_ops_only():
                assert torch.equal(step(), eager)


def test_fast_path_gradients_fail_where_the_custom_op_has_none():
    """dynamic_threshold and sampler_step have no backward: an input requiring grad takes the
    custom op, whose backward fails loudly, on both paths."""
    x = torch.randn(2, 3, 4, 4, device=DEVICE, requires_grad=True)
    for custom in (False, True):
        with ops.api.custom_ops_only() if custom else torch.enable_grad():
            y = ops.dynamic_threshold(x, 0.9)
            with pytest.raises(RuntimeError, match="no autograd formula"):
                y.sum().backward()


def test_fast_path_only_in_plain_eager_mode(monkeypatch):
    """The custom op runs where something watches the call: under custom_ops_only, a dispatch
    mode, torch.compile (test_torch_compile_*) and torch.export (test_torch_export_sees_the_ops)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.name())
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    with Seen() as seen:
        ops.group_norm_silu(x, 2)
    assert "imagen_fast::group_norm_silu_fwd" in seen.ops
    monkeypatch.setattr(ops.api, "_gn_fwd", None)      # the fast path never calls the custom op
    ops.group_norm_silu(x, 2)
    ops.group_norm_silu(x.requires_grad_(), 2).sum().backward()
    with ops.api.custom_ops_only(), pytest.raises(TypeError):
        ops.group_norm_silu(x, 2)
