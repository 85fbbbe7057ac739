"""imagen_fast.accelerate on imagen-pytorch: a tiny random Unet (channel RMS norm + time
scale/shift + SiLU blocks, cosine-sim multi-query attention with null keys, cross
attention), Imagen's and ElucidatedImagen's dynamic thresholding (torch.quantile).

Equivalence is checked as in test_patch_diffusers.py: the accelerated float32 model
against the original in float64, within a small multiple of the original float32
model's error.
"""
import copy

import pytest
import torch

from imagen_fast.patch._peers import import_imagen_pytorch

try:
    ip = import_imagen_pytorch()
except ImportError as e:  # pragma: no cover - installed by make venv
    pytest.skip(f"imagen-pytorch not installed: {e}", allow_module_level=True)

import imagen_fast  # noqa: E402
from imagen_fast.patch import _imagen_pytorch as pi  # noqa: E402
from support.patch_helpers import assert_equivalent, assert_same_state, module_types, state  # noqa: E402

TEXT_DIM, TEXT_LEN = 32, 6
UNET = dict(dim=16, dim_mults=(1, 2), num_resnet_blocks=1, text_embed_dim=TEXT_DIM,
            layer_attns=(False, True), layer_cross_attns=(False, True), attn_heads=2,
            attn_dim_head=8, max_text_len=TEXT_LEN, cond_dim=32, attn_pool_text=False,
            init_cross_embed=False)


def _unet(seed=0, **over):
    torch.manual_seed(seed)
    unet = ip.Unet(**dict(UNET, **over))
    for p in unet.parameters():       # zero-initialised layers would hide whole paths
        p.data.add_(torch.randn_like(p) * 0.05)
    return unet


def _inputs(batch=3, seed=1, res=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, res, res, generator=g)
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    mask = torch.rand(batch, TEXT_LEN, generator=g) > 0.3
    mask[:, 0] = True
    mask[-1] = False
    times = torch.tensor([0.1, 0.5, 0.9][:batch])
    return {"args": [x, times], "kwargs": dict(text_embeds=text, text_mask=mask)}


def test_unet_outputs_and_gradients():
    report = assert_equivalent(_unet(), _inputs())
    kinds = {e.kind for e in report.replaced}
    assert {"Block", "Attention", "CrossAttention"} <= kinds


def test_unet_memory_efficient_and_channels_last():
    unet = _unet(seed=2, memory_efficient=True, dim_mults=(1, 2, 2), layer_attns=(False, False, True),
                 layer_cross_attns=(False, True, True))
    inp = _inputs(batch=2, seed=3, res=16)
    inp["args"][0] = inp["args"][0].contiguous(memory_format=torch.channels_last)
    assert_equivalent(unet, inp)


def test_cross_attention_text_mask():
    """CrossAttention with a text mask (imagen-pytorch passes one in its prior networks):
    the mask is honoured (with a null key always kept)."""
    torch.manual_seed(4)
    attn = ip.imagen_pytorch.CrossAttention(dim=16, context_dim=TEXT_DIM, dim_head=8, heads=2)
    x = torch.randn(3, 10, 16)
    ctx = torch.randn(3, TEXT_LEN, TEXT_DIM)
    mask = torch.rand(3, TEXT_LEN) > 0.4
    mask[-1] = False
    inputs = {"args": [x, ctx], "kwargs": dict(mask=mask)}
    assert_equivalent(attn, inputs)
    fast = copy.deepcopy(attn)
    imagen_fast.accelerate(fast)
    with torch.no_grad():
        assert (fast(x, ctx, mask=mask) - fast(x, ctx)).abs().max() > 1e-4


def test_state_dict_unchanged_and_restore_exact():
    unet = _unet()
    before, types = state(unet), module_types(unet)
    modules = dict(unet.named_modules())
    report = imagen_fast.accelerate(unet)
    assert_same_state(unet, before)
    assert any(type(m) is pi.FastBlock for m in unet.modules())
    left = {e.kind for e in report.left_alone}
    assert "LayerNorm" in left                       # reported with its reason
    imagen_fast.restore(unet)
    assert_same_state(unet, before)
    assert module_types(unet) == types
    assert all(dict(unet.named_modules())[n] is m for n, m in modules.items())


def test_linear_attention_left_alone():
    unet = _unet(use_linear_attn=True, use_linear_cross_attn=True, layer_attns=False)
    report = imagen_fast.accelerate(unet)
    reasons = {e.kind: e.detail for e in report.left_alone}
    assert "LinearCrossAttention" in reasons and "subclass" in reasons["LinearCrossAttention"]
    assert "LinearAttention" in reasons


# ------------------------------------------------------------------ thresholding
def _imagen(cls=ip.Imagen, **kw):
    unet = _unet()
    return cls(unets=(unet,), image_sizes=(8,), text_embed_dim=TEXT_DIM, channels=3,
               dynamic_thresholding_percentile=0.95, **kw)


@pytest.mark.parametrize("objective", ["noise", "v"])
def test_imagen_dynamic_thresholding_identical(objective):
    imagen = _imagen(timesteps=20, pred_objectives=objective)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.2, 0.5, 0.7, 0.95])
    # model outputs at several scales: samples with s = 1 and with s far above 1
    pred = torch.randn(4, 3, 8, 8, generator=g) * torch.tensor([0.1, 1.0, 3.0, 10.0]).reshape(-1, 1, 1, 1)
    kw = dict(noise_scheduler=imagen.noise_schedulers[0], model_output=pred,
              t_next=t - 0.05, pred_objective=objective)
    (mean0, var0, logvar0), x0 = imagen.p_mean_variance(imagen.unets[0], x, t, **kw)
    report = imagen_fast.accelerate(imagen)
    assert any("p_mean_variance" in e.detail for e in report.replaced)
    (mean1, var1, logvar1), x1 = imagen.p_mean_variance(imagen.unets[0], x, t, **kw)
    assert (x0.abs().amax(dim=(1, 2, 3)) <= 1).all() and not torch.equal(x0, x0.clamp(-0.5, 0.5))
    torch.testing.assert_close(x1, x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(mean1, mean0, rtol=0, atol=1e-6)
    torch.testing.assert_close(var1, var0, rtol=0, atol=0)
    imagen_fast.restore(imagen)
    assert "p_mean_variance" not in vars(imagen)


def test_imagen_sampling_step_identical():
    """A whole p_sample step through imagen-pytorch's code, patched vs unpatched."""
    imagen = _imagen(timesteps=20).eval()
    inp = _inputs(batch=2)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(12)) * 3
    t = torch.tensor([0.6, 0.6])
    kw = dict(t_next=t - 0.05, noise_scheduler=imagen.noise_schedulers[0],
              text_embeds=inp["kwargs"]["text_embeds"], text_mask=inp["kwargs"]["text_mask"],
              cond_scale=5.0, dynamic_threshold=True)
    torch.manual_seed(13)
    before = imagen.p_sample(imagen.unets[0], x, t, **kw)
    imagen_fast.accelerate(imagen)
    torch.manual_seed(13)
    after = imagen.p_sample(imagen.unets[0], x, t, **kw)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_elucidated_threshold_identical():
    imagen = _imagen(ip.ElucidatedImagen)
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(14)) * \
        torch.tensor([0.2, 1.1, 2.0, 6.0]).reshape(-1, 1, 1, 1)
    expected = imagen.threshold_x_start(x0)
    report = imagen_fast.accelerate(imagen)
    assert any("threshold_x_start" in e.detail for e in report.replaced)
    torch.testing.assert_close(imagen.threshold_x_start(x0), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(imagen.threshold_x_start(x0, dynamic_threshold=False),
                               x0.clamp(-1, 1), rtol=0, atol=0)
