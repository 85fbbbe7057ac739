"""imagen_fast.accelerate on diffusers: DeepFloyd IF-style UNet2DConditionModel (stage I
and stage II configurations, tiny and random, built here: no download) and the
DDPM/DDIM schedulers' thresholding.

Equivalence: the accelerated float32 model's outputs and gradients are compared with
the original model evaluated in float64, within a small multiple of the original
float32 model's own error (the op contract's rule, tests/support/numerics.py).
"""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import imagen_fast  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnAddedKVProcessor2_0  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402
from imagen_fast.patch import _diffusers as pd  # noqa: E402
from support.patch_helpers import assert_equivalent, assert_same_state, module_types, state  # noqa: E402

TEXT_DIM, TEXT_LEN = 24, 7

# The IF stage configurations (IF-I-XL / IF-II-L), shrunk: same block types, norms,
# activations and conditioning; small widths.
IF_COMMON = dict(
    block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=16, norm_num_groups=8,
    cross_attention_dim=32, encoder_hid_dim=TEXT_DIM, addition_embed_type="text",
    addition_embed_type_num_heads=2, resnet_time_scale_shift="scale_shift", act_fn="gelu",
    cross_attention_norm="group_norm", resnet_skip_time_act=True, resnet_out_scale_factor=1.414,
    only_cross_attention=False, mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
)
STAGE_I = dict(IF_COMMON, sample_size=8, in_channels=3, out_channels=6,
               down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"))
STAGE_II = dict(IF_COMMON, sample_size=8, in_channels=6, out_channels=6, class_embed_type="timestep",
                down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"))


def _unet(config, seed=0):
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config)
    for p in model.parameters():      # diffusers zero-inits some layers: make every path count
        p.data.add_(torch.randn_like(p) * 0.05)
    return model


def _text(batch, seed):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    mask = torch.rand(batch, TEXT_LEN, generator=g) > 0.3
    mask[:, 0] = True
    mask[-1] = False                  # a dropped prompt: every text token padded
    return text, mask


def _inputs(config, batch=3, seed=1, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], 8, 8, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    text, mask = _text(batch, seed + 1)
    kwargs = dict(encoder_hidden_states=text, encoder_attention_mask=mask)
    if config.get("class_embed_type") == "timestep":
        kwargs["class_labels"] = torch.tensor([20, 250, 600][:batch])
    return {"args": [x, torch.tensor([3, 400, 999][:batch])], "kwargs": kwargs}


@pytest.mark.parametrize("config,channels_last", [(STAGE_I, False), (STAGE_II, True)],
                         ids=["stage_I", "stage_II_channels_last"])
def test_if_unet_outputs_and_gradients(config, channels_last):
    model = _unet(config)
    report = assert_equivalent(model, _inputs(config, channels_last=channels_last))
    kinds = {e.kind for e in report.replaced}
    assert {"ResnetBlock2D", "Attention"} <= kinds


def test_masks_reach_the_kernel_and_matter():
    """The text padding mask changes the output (so a dropped mask would be caught), and a
    fully padded prompt equals attending to the image tokens alone."""
    model = _unet(STAGE_I)
    imagen_fast.accelerate(model)
    inp = _inputs(STAGE_I)
    with torch.no_grad():
        masked = model(*inp["args"], **inp["kwargs"]).sample
        open_mask = dict(inp["kwargs"], encoder_attention_mask=torch.ones_like(
            inp["kwargs"]["encoder_attention_mask"]))
        unmasked = model(*inp["args"], **open_mask).sample
    assert (masked - unmasked).abs().max() > 1e-3


def test_state_dict_unchanged_and_restore_exact():
    model = _unet(STAGE_II)
    before, types = state(model), module_types(model)
    modules = dict(model.named_modules())
    processors = {n: m.processor for n, m in modules.items() if hasattr(m, "processor")}
    report = imagen_fast.accelerate(model)
    assert_same_state(model, before)
    assert any(type(m) is pd.FastResnetBlock2D for m in model.modules())
    assert isinstance(model.mid_block.attentions[0].processor, pd.FastAddedKVProcessor)
    again = imagen_fast.accelerate(model)                      # idempotent
    assert not again.replaced and any("already" in e.detail for e in again.left_alone)
    restored = imagen_fast.restore(model)
    assert restored.replaced
    assert_same_state(model, before)
    assert module_types(model) == types
    after = dict(model.named_modules())
    assert all(after[n] is m for n, m in modules.items()), "modules were replaced, not restored"
    for n, p in processors.items():
        assert after[n].processor is p
    assert len(report.replaced) >= 8


def test_report_says_what_was_left_alone():
    model = _unet(STAGE_I)
    model.down_blocks[0].resnets[0].nonlinearity = torch.nn.Mish()
    model.mid_block.attentions[0].set_processor(AttnAddedKVProcessor2_0())
    plain = model.down_blocks[1].attentions[0]
    from diffusers.models.attention_processor import AttnProcessor2_0
    plain.set_processor(AttnProcessor2_0())
    report = imagen_fast.accelerate(model)
    left = {e.path: e.detail for e in report.left_alone}
    assert "Mish" in left["down_blocks.0.resnets.0"]
    assert "AttnProcessor2_0" in left["down_blocks.1.attentions.0"]
    assert "add_embedding.pool" in left                         # attention pooling of the text
    replaced = {e.path for e in report.replaced}
    assert "mid_block.attentions.0" in replaced
    assert "down_blocks.0.resnets.0.norm1" in replaced          # its block was left: plain GN
    assert str(report).count("\n") == len(report.replaced) + len(report.left_alone)


def test_unexpressible_bias_goes_to_the_original_processor():
    """A float bias that is not 0 / <= -1e4 cannot be a padding mask: same as the original."""
    model = _unet(STAGE_I)
    fast = copy.deepcopy(model)
    imagen_fast.accelerate(fast)
    attn_o = model.mid_block.attentions[0]
    attn_f = fast.mid_block.attentions[0]
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 64, 2, 2, generator=g)
    text = torch.randn(3, TEXT_LEN, 32, generator=g)
    bias = -torch.rand(3, 1, TEXT_LEN, generator=g) * 3
    with torch.no_grad():
        torch.testing.assert_close(attn_f(h, encoder_hidden_states=text, attention_mask=bias),
                                   attn_o(h, encoder_hidden_states=text, attention_mask=bias))
        ok, keep = pd.text_keep_mask(bias, 3, TEXT_LEN)
        assert not ok
        assert pd.text_keep_mask(torch.zeros(3, 1, TEXT_LEN), 3, TEXT_LEN) == (True, None)


# --------------------------------------------------------------------- schedulers
def _x0(seed=7):
    """Samples below 1, between 1 and sample_max_value and above it, in one batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 9, 11, generator=g)
    return x * torch.tensor([0.3, 1.2, 2.5, 8.0]).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scheduler_thresholding_identical(cls, dtype):
    sched = cls(num_train_timesteps=50, thresholding=True, dynamic_thresholding_ratio=0.95,
                sample_max_value=1.5, clip_sample=False)
    x = _x0().to(dtype)
    expected = sched._threshold_sample(x)
    report = imagen_fast.accelerate(sched)
    assert [e.detail for e in report.replaced] == ["_threshold_sample -> ops.dynamic_threshold"]
    got = sched._threshold_sample(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-7 if dtype == torch.float32 else 1e-3)
    # a whole step through the scheduler's own code
    sched.set_timesteps(10)
    t = sched.timesteps[3]
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    fast_step = sched.step(eps, t, x, generator=torch.Generator().manual_seed(9)).prev_sample
    imagen_fast.restore(sched)
    assert "_threshold_sample" not in vars(sched)
    slow_step = sched.step(eps, t, x, generator=torch.Generator().manual_seed(9)).prev_sample
    torch.testing.assert_close(fast_step, slow_step, rtol=0, atol=1e-6 if dtype == torch.float32 else 2e-3)


def test_scheduler_without_thresholding_left_alone():
    sched = DDPMScheduler(thresholding=False)
    report = imagen_fast.accelerate(sched)
    assert not report.replaced and "thresholding=False" in report.left_alone[0].detail
    with pytest.raises(TypeError, match="accelerate takes"):
        imagen_fast.accelerate(object())


def test_resnet_default_time_norm():
    """time_embedding_norm="default" (temb added before norm2) is fused too."""
    torch.manual_seed(3)
    block = ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=8, groups=4,
                          non_linearity="silu", time_embedding_norm="default", down=True)
    x = torch.randn(2, 16, 6, 6)
    temb = torch.randn(2, 8)
    inputs = {"args": [x, temb], "kwargs": {}}
    assert_equivalent(block, inputs)
