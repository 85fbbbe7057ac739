"""The cascade: per-stage settings, sampling through the stages, training losses,
safetensors + JSON checkpoints and the architecture-mismatch errors."""
import json
import os

import pytest
import torch

from imagen_fast.cascade import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ImagenCascade,
    SamplingConfig,
    Stage,
    default_stage,
)

TINY = ["tiny-base32", "tiny-sr64", "tiny-sr128"]


def tiny_cascade(seed=0, **overrides):
    torch.manual_seed(seed)
    return ImagenCascade.from_presets(TINY, names=["base", "sr64", "sr128"], **overrides)


def text_batch(b=2, length=5, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[-1, 2:] = False
    return torch.randn(b, length, dim, generator=g), mask


FAST = [dict(steps=2), dict(steps=2, sampler="ddim"), dict(steps=2, sampler="dpmpp2m")]


def test_default_stages_follow_the_paper():
    c = tiny_cascade()
    base, sr64, sr128 = c.stages
    assert base.sampling.guidance == 1.35 and sr64.sampling.guidance == 8.0
    assert all(st.sampling.percentile == 0.995 and st.sampling.threshold == "dynamic" for st in c.stages)
    assert base.diffusion.schedule.name == "cosine" and sr64.diffusion.schedule.name == "cosine"
    assert sr128.diffusion.schedule.name == "linear"          # the 256->1024 architecture
    assert not base.diffusion.noise_aug and sr64.diffusion.noise_aug and sr128.diffusion.noise_aug
    assert all(st.diffusion.cond_drop_prob == 0.1 for st in c.stages)
    assert [st.resolution for st in c.stages] == [32, 64, 128]


def test_cascade_samples_every_stage_with_its_own_settings():
    c = tiny_cascade()
    calls = []
    for st in c.stages:
        st.unet.register_forward_pre_hook(
            lambda m, args, kwargs, name=st.name: calls.append((name, args[0].shape[0], args[0].shape[-1],
                                                                kwargs.get("aug_level"))),
            with_kwargs=True)
    text, mask = text_batch()
    settings = [dict(steps=3, guidance=1.0), dict(steps=2, sampler="ddim", aug_level=0.2),
                dict(steps=1, sampler="dpmpp2m", guidance=5.0)]
    outs = c.sample(text, mask, generator=torch.Generator().manual_seed(0), sampling=settings,
                    return_all=True)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 32, 32), (2, 3, 64, 64), (2, 3, 128, 128)]
    assert all(torch.isfinite(o).all() and o.abs().max() <= 1 for o in outs)
    names = [c_[0] for c_ in calls]
    assert names == ["base"] * 3 + ["sr64"] * 2 + ["sr128"] * 1
    # guidance 1 runs batch B; guided stages run one batch of 2B
    assert [c_[1] for c_ in calls] == [2, 2, 2, 4, 4, 4]
    assert torch.allclose(calls[3][3], torch.full((4,), 0.2))
    # the stored settings are untouched by per-call overrides
    assert c.stages[0].sampling.steps == 64
    # fewer stages, other resolution for the last stage
    img = c.sample(text, mask, num_stages=2, sampling=FAST)
    assert img.shape == (2, 3, 64, 64)
    img = c.sample(text, mask, sampling=FAST, resolutions=[None, None, 96])
    assert img.shape == (2, 3, 96, 96)


def test_cascade_loss_every_stage():
    c = tiny_cascade()
    text, mask = text_batch()
    g = torch.Generator().manual_seed(0)
    for i, res in enumerate((32, 64, 128)):
        images = torch.rand(2, 3, res, res, generator=g) * 2 - 1
        loss = c.loss(i, images, text, mask, generator=g)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
    # super-resolution on crops: a 32x32 crop conditions on its 16x16 low-res version
    loss = c.loss("sr64", torch.rand(2, 3, 32, 32) * 2 - 1, text, mask)
    assert torch.isfinite(loss)


def test_save_load_roundtrip(tmp_path):
    c = tiny_cascade()
    c.stages[1].sampling = c.stages[1].sampling.replace(steps=7, aug_level=0.25)
    c.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["format"] == "imagen-fast-cascade" and len(config["stages"]) == 3
    from safetensors import safe_open
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        assert json.loads(f.metadata()["config"]) == config
    loaded = ImagenCascade.load(str(tmp_path))
    assert loaded.config() == c.config()
    assert loaded.stages[1].sampling.steps == 7 and loaded.stages[1].sampling.aug_level == 0.25
    for (k, a), (k2, b) in zip(c.state_tensors().items(), loaded.state_tensors().items()):
        assert k == k2 and torch.equal(a, b)
    text, mask = text_batch()
    a = c.sample(text, mask, sampling=FAST, generator=torch.Generator().manual_seed(3))
    b = loaded.sample(text, mask, sampling=FAST, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    # loading into a fresh cascade of the same architecture
    other = tiny_cascade(seed=1)
    other.load_weights(str(tmp_path))
    assert all(torch.equal(x, y) for x, y in zip(other.state_tensors().values(),
                                                 c.state_tensors().values()))


def test_loading_the_wrong_architecture_names_the_mismatch(tmp_path):
    tiny_cascade().save(str(tmp_path))
    fewer = ImagenCascade.from_presets(TINY[:2])
    with pytest.raises(ValueError, match=r"checkpoint has 3 stage\(s\), the cascade 2"):
        fewer.load_weights(str(tmp_path))
    narrower = ImagenCascade([default_stage("base", "tiny-base32", model_channels=16),
                              default_stage("sr64", "tiny-sr64"), default_stage("sr128", "tiny-sr128")])
    with pytest.raises(ValueError, match=r"model_channels=32 \(checkpoint\) vs 16 \(model\)") as e:
        narrower.load_weights(str(tmp_path))
    assert "shape mismatch" in str(e.value) and "stages.0." in str(e.value)
    swapped = ImagenCascade.from_presets(["tiny-base32", "tiny-sr64", "tiny-sr64"])
    with pytest.raises(ValueError, match="stage 2"):
        swapped.load_weights(str(tmp_path))
    # a config that is not ours
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an imagen-fast-cascade checkpoint"):
        ImagenCascade.load(str(tmp_path))


def test_cascade_validation():
    base = default_stage("base", "tiny-base32")
    sr = default_stage("sr", "tiny-sr64")
    with pytest.raises(ValueError, match="first stage"):
        ImagenCascade([sr])
    with pytest.raises(ValueError, match="not a super-resolution"):
        ImagenCascade([base, default_stage("base2", "tiny-base32")])
    with pytest.raises(ValueError, match="text width"):
        ImagenCascade([base, default_stage("sr", "tiny-sr64", text_dim=16)])
    with pytest.raises(ValueError, match="sampler"):
        SamplingConfig(sampler="heun")
    with pytest.raises(ValueError, match="unknown sampling.*now 'guidance'"):
        SamplingConfig().replace(guidance_scale=3)
    c = ImagenCascade([base, sr])
    with pytest.raises(ValueError, match="text_dim"):
        c.sample(torch.randn(1, 4, 8))
    with pytest.raises(KeyError):
        c.stage("nope")
    assert isinstance(c.stage("sr"), Stage)
