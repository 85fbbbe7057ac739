"""U-Nets: presets, forward/backward in float32 and bfloat16, text masks, layout,
checkpointing, torch.compile, and model-level agreement between op backends."""
import math
import time

import pytest
import torch

from support.models import make_inputs, randomize_output

from imagen_fast import ops
from imagen_fast.models import (
    PRESETS,
    build_unet,
    describe_presets,
    preset_config,
    unet_from_config,
)
from imagen_fast.models.unet import SKIP_SCALE, DBlock, UBlock

SMALL = ["tiny-base32", "tiny-sr64", "tiny-sr128"]


# ------------------------------------------------------------------ presets
def test_describe_presets_counts_on_meta_and_is_fast():
    t0 = time.perf_counter()
    rows = describe_presets()
    assert time.perf_counter() - t0 < 30
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(PRESETS)
    for r in rows:
        assert set(r) >= {"name", "stage", "resolution", "params"}
        assert r["stage"] in ("base", "sr") and r["params"] > 0
    # the paper's sizes: about 2B, 600M, 400M
    assert 1.8e9 < by_name["base64"]["params"] < 2.5e9
    assert 4.5e8 < by_name["sr256"]["params"] < 7.0e8
    assert 3.5e8 < by_name["sr1024"]["params"] < 5.5e8
    assert by_name["base64"]["resolution"] == 64 and by_name["sr256"]["resolution"] == 256
    assert by_name["sr1024"]["resolution"] == 1024
    # the meta count is the real count
    for name in SMALL:
        assert by_name[name]["params"] == sum(p.numel() for p in build_unet(name).parameters())


def test_efficient_unet_paper_structure():
    for name, heads_level in (("sr256", "self"), ("sr1024", "cross")):
        model = unet_from_config(preset_config(name), device="meta")
        assert [len(b.res) for b in model.dblocks] == [2, 4, 8, 8]
        assert [len(b.res) for b in model.ublocks] == [8, 8, 4, 2]
        assert [b.down.out_channels for b in model.dblocks] == [128, 256, 512, 1024]
        # attention only at the 1024-channel level
        assert [b.attn is not None for b in model.dblocks] == [False, False, False, True]
        assert [b.attn is not None for b in model.ublocks] == [True, False, False, False]
        assert {a.mode for a in model.dblocks[3].attn} == {heads_level}
        assert model.dblocks[3].attn[0].num_heads == 8
        assert model.lowres_cond and model.input_conv.in_channels == 6
    assert SKIP_SCALE == pytest.approx(1 / math.sqrt(2))


def test_base_unet_paper_structure():
    model = unet_from_config(preset_config("base64"), device="meta")
    attn = [m for m in model.modules() if m.__class__.__name__ == "AttentionBlock"]
    assert attn and all(a.head_dim == 64 and a.mode == "self" for a in attn)
    assert model.cond.aug_embed is None and not model.lowres_cond


def test_dblock_resamples_before_and_ublock_after_convs():
    model = build_unet("tiny-sr64")
    seen = []
    for name, mod in model.named_modules():
        if name.endswith("res.0"):
            mod.register_forward_pre_hook(lambda m, a, name=name: seen.append((name, a[0].shape[-1])))
    x, t, text, mask, kw = make_inputs(model, batch=1)
    model(x, t, text, mask, **kw)
    sizes = dict(seen)
    # DBlock k's ResBlocks run at H / 2^(k+1): the strided conv came first
    assert [sizes[f"dblocks.{k}.res.0"] for k in range(3)] == [32, 16, 8]
    # UBlocks run at their level's resolution and upsample after their convs
    assert [sizes[f"ublocks.{k}.res.0"] for k in range(3)] == [8, 16, 32]
    assert isinstance(model.dblocks[0], DBlock) and isinstance(model.ublocks[0], UBlock)


def test_preset_errors_name_the_problem():
    with pytest.raises(ValueError, match="tiny-base32"):
        build_unet("no-such-preset")
    with pytest.raises(ValueError, match="bad U-Net config"):
        build_unet("tiny-base32", not_a_field=3)
    model = build_unet("tiny-sr64")
    x, t, text, mask, _ = make_inputs(model, batch=1)
    with pytest.raises(ValueError, match="lowres"):
        model(x, t, text, mask)
    with pytest.raises(ValueError, match="text_mask"):
        model(x, t, text, mask[:, :2], lowres=torch.zeros(1, 3, 32, 32))


# ------------------------------------------------------- forward / backward
@pytest.mark.parametrize("name", SMALL)
def test_forward_backward_float32(name):
    torch.manual_seed(0)
    model = randomize_output(build_unet(name))
    x, t, text, mask, kw = make_inputs(model)
    y = model(x, t, text, mask, **kw)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # the conditioning reaches the loss: time, pooled text, text tokens, (aug level)
    for key in ("cond.time_embed.mlp.0.weight", "cond.text_pool.to_kv.weight", "cond.text_proj.weight"):
        assert grads[key].abs().sum() > 0, key
    if kw:
        assert grads["cond.aug_embed.mlp.0.weight"].abs().sum() > 0


@pytest.mark.parametrize("name", SMALL)
def test_forward_backward_bfloat16(name):
    torch.manual_seed(0)
    model = randomize_output(build_unet(name))
    x, t, text, mask, kw = make_inputs(model)
    with torch.no_grad():
        ref = model(x, t, text, mask, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, t, text, mask, **kw)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    err = (y.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.1, f"autocast bf16 vs float32 relative error {err:.3g}"
    # parameters in bfloat16 too
    model_bf = randomize_output(build_unet(name, dtype=torch.bfloat16))
    y2 = model_bf(x, t, text, mask, **kw)
    assert y2.dtype == torch.bfloat16 and torch.isfinite(y2).all()
    y2.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model_bf.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["tiny-base32", "tiny-sr128"])
def test_dropped_text_and_all_padding_masks_are_finite(name):
    torch.manual_seed(0)
    model = randomize_output(build_unet(name))
    x, t, text, mask, kw = make_inputs(model)
    cases = {
        "dropped (zeros, all masked)": (torch.zeros_like(text), torch.zeros_like(mask)),
        "all padding, nonzero embeddings": (text, torch.zeros_like(mask)),
        "no text at all": (None, None),
    }
    for what, (te, tm) in cases.items():
        model.zero_grad()
        y = model(x, t, te, tm, **kw)
        assert torch.isfinite(y).all(), what
        y.square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), what


@pytest.mark.parametrize("name", ["tiny-base32", "tiny-sr128"])
def test_padded_tokens_are_ignored(name):
    """The key padding mask is honoured: changing masked tokens changes nothing."""
    torch.manual_seed(0)
    model = randomize_output(build_unet(name)).eval()
    x, t, text, mask, kw = make_inputs(model)
    text2 = text.clone()
    text2[~mask] = 100 * torch.randn_like(text2[~mask])
    with torch.no_grad():
        a = model(x, t, text, mask, **kw)
        b = model(x, t, text2, mask, **kw)
        c = model(x, t, text2, torch.ones_like(mask), **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 1e-4          # ...while unmasked tokens do matter


def test_channels_last_and_contiguous_inputs_agree():
    torch.manual_seed(0)
    model = randomize_output(build_unet("tiny-sr64")).eval()
    x, t, text, mask, kw = make_inputs(model)
    with torch.no_grad():
        a = model(x.contiguous(), t, text, mask, **kw)
        b = model(x.contiguous(memory_format=torch.channels_last), t, text, mask, **kw)
    torch.testing.assert_close(a, b)
    conv_weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)


@pytest.mark.parametrize("name", ["tiny-base32", "tiny-sr64"])
def test_activation_checkpointing_matches(name):
    torch.manual_seed(0)
    plain = randomize_output(build_unet(name))
    ckpt = randomize_output(build_unet(name, use_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t, text, mask, kw = make_inputs(plain)
    ya = plain(x, t, text, mask, **kw)
    yb = ckpt(x, t, text, mask, **kw)
    torch.testing.assert_close(ya, yb)
    ya.square().mean().backward()
    yb.square().mean().backward()
    for (n, pa), pb in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["tiny-base32", "tiny-sr128"])
def test_torch_compile_fullgraph(name):
    """The whole U-Net forward (and its backward) compiles as one graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomize_output(build_unet(name, image_size=16 if name == "tiny-base32" else 32))
    x, t, text, mask, kw = make_inputs(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x, t, text, mask, **kw)
    y.square().mean().backward()
    ref = model(x, t, text, mask, **kw)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def _fast_backends():
    from support.device import backend_available
    return [b for b in ("cpu",) if backend_available(b) == "available"]


@pytest.mark.parametrize("name", SMALL)
def test_fast_backend_matches_torch_backend(name):
    """Same model, same inputs: the compiled CPU kernels agree with the reference
    backend within the op tolerances (float32: a few 1e-5 relative)."""
    backends = _fast_backends()
    if not backends:
        pytest.skip("no compiled CPU backend available")
    torch.manual_seed(0)
    model = randomize_output(build_unet(name))
    x, t, text, mask, kw = make_inputs(model)
    with ops.use_backend("torch"):
        ref = model(x, t, text, mask, **kw)
        ref.square().mean().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    for backend in backends:
        model.zero_grad()
        with ops.use_backend("auto"):
            y = model(x, t, text, mask, **kw)
            y.square().mean().backward()
        scale = ref.abs().max()
        assert (y - ref).abs().max() <= 1e-4 * scale, backend
        for (n, p), g in zip(model.named_parameters(), ref_grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5 * (1 + g.abs().max().item()),
                                       msg=f"{backend}: {n}")
