"""A super-resolution stage sampled from a truncated start (sampling setting ``start``):
the run begins at t = start from the stage's low-res input upsampled bicubically
(core.cubic_resize_matrix, torch's bicubic) and diffused there; training may draw
t ~ U(0, t_max) for such a stage."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imagen_fast import core
from imagen_fast.cascade import ImagenCascade
from imagen_fast.diffusion import GaussianDiffusion, sample
from imagen_fast.train_config import ConfigError, config_from_dict


@pytest.mark.parametrize("n_in,n_out", [(64, 256), (16, 64), (5, 17), (7, 3), (1, 4), (9, 9)])
def test_cubic_resize_matrix_is_torchs_bicubic(n_in, n_out):
    g = torch.Generator().manual_seed(n_in * 100 + n_out)
    x = torch.randn(2, 3, n_in, n_in + 2, generator=g, dtype=torch.float64)
    ref = F.interpolate(x, size=(n_out, n_out + 1), mode="bicubic", align_corners=False)
    mh = torch.as_tensor(core.cubic_resize_matrix(n_in, n_out))
    mw = torch.as_tensor(core.cubic_resize_matrix(n_in + 2, n_out + 1))
    torch.testing.assert_close(mh @ x @ mw.T, ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="n_out"):
        core.cubic_resize_matrix(4, 0)


def test_time_grid_and_coefficients_start_below_one():
    assert core.time_grid(4, 0.5) == [0.5, 0.375, 0.25, 0.125, 0.0]
    assert core.time_grid(4, 1) == core.time_grid(4)
    for bad in (0.0, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="start"):
            core.time_grid(4, bad)
    schedule = core.schedule_config("cosine")
    table = core.coefficient_table(schedule, 4, "ddim", 0.0, "v", start=0.5)
    a_t, s_t = core.alpha_sigma_at(schedule, 0.375)
    a_s, s_s = core.alpha_sigma_at(schedule, 0.25)
    row = core.step_coefficients(*(np.float64(v) for v in (a_t, s_t, a_s, s_s)), sampler="ddim",
                                 prediction="v")
    np.testing.assert_array_equal(table[1], np.array(row))
    assert core.SamplingConfig(start=0.25).start == 0.25 and core.SamplingConfig().start == 1.0
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="start"):
            core.SamplingConfig(start=bad)


class Spy:
    """A v-predicting stand-in that records what it is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, z, t, text, mask, lowres=None, aug_level=None):
        self.calls.append((z.clone(), t.clone()))
        return 0.3 * z - 0.1 * F.interpolate(lowres, size=z.shape[-2:], mode="nearest")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_sampler_starts_from_the_diffused_upsampled_lowres(sampler):
    g = torch.Generator().manual_seed(3)
    lowres = torch.rand(2, 3, 6, 6, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 24, 24, generator=g)
    diffusion = GaussianDiffusion("cosine", prediction="v", noise_aug=True)
    spy = Spy()
    out = sample(spy, diffusion, (2, 3, 24, 24), lowres=lowres, noise=noise, sampler=sampler,
                 steps=3, start=0.3, generator=torch.Generator().manual_seed(0))
    assert len(spy.calls) == 3
    assert [round(float(t[0]), 6) for _, t in spy.calls] == [0.3, 0.2, 0.1]
    a, s = core.alpha_sigma_at(diffusion.schedule.config(), 0.3)
    up = F.interpolate(lowres.double(), size=(24, 24), mode="bicubic", align_corners=False)
    torch.testing.assert_close(spy.calls[0][0].double(), a * up + s * noise.double(), rtol=0, atol=1e-5)
    full = sample(Spy(), diffusion, (2, 3, 24, 24), lowres=lowres, noise=noise, sampler=sampler,
                  steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and (out - full).abs().max() > 1e-3


def test_a_start_below_one_needs_a_lowres_image():
    diffusion = GaussianDiffusion("cosine")
    with pytest.raises(ValueError, match="start"):
        sample(Spy(), diffusion, (1, 3, 8, 8), start=0.5, steps=2)


def test_cascade_refuses_a_truncated_base_stage_before_sampling():
    cascade = ImagenCascade.from_presets(("tiny-base32", "tiny-sr64"), names=["base", "sr"])
    for st in cascade.stages:
        st.sampling = st.sampling.replace(steps=2)
    calls = []
    handle = cascade.stages[0].unet.register_forward_hook(lambda *a: calls.append(1))
    emb = torch.randn(1, 4, cascade.text_dim)
    with pytest.raises(ValueError, match="start: stage 'base' is a base stage"):
        cascade.sample(emb, sampling=[{"start": 0.5}, None])
    assert not calls
    handle.remove()
    out = cascade.sample(emb, sampling=[None, {"start": 0.5}], generator=torch.Generator().manual_seed(1))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def _raw(out_dir, t_max, sr=True):
    """A tiny 16 -> 64 SR stage on 16 px crops (or a tiny 32 px base stage)."""
    if not sr:
        return {"model": {"preset": "tiny-base32", "overrides": {"text_dim": 16}},
                "diffusion": {"t_max": t_max},
                "data": {"kind": "shapes", "path": "shapes:8:0", "resolution": 32},
                "text": {"encoder": "hash:16", "max_length": 8},
                "train": {"steps": 1, "batch_size": 4}, "log": {"out_dir": str(out_dir)}}
    return {
        "model": {"preset": "tiny-sr128", "overrides": {
            "image_size": 64, "lowres_size": 16, "channels": [8, 16], "num_res_blocks": [1, 1],
            "self_attention": [False, False], "cross_attention": [False, True], "num_heads": 2,
            "text_dim": 16, "context_dim": 16, "emb_dim": 32, "groups": 4, "pool_heads": 2}},
        "diffusion": {"prediction": "v", "t_max": t_max},
        "data": {"kind": "shapes", "path": "shapes:16:5", "resolution": 64, "lowres_resolution": 16,
                 "crop_size": 16},
        "text": {"encoder": "hash:16", "max_length": 8},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "seed": 7},
        "log": {"out_dir": str(out_dir), "log_every": 1, "ckpt_every": 2, "progress": False,
                "tensorboard": False, "sample_every": 2, "sample_steps": 2, "sample_guidance": 1.0,
                "sample_prompts": ["a red circle"]},
    }


def test_training_draws_t_below_t_max(tmp_path, monkeypatch):
    import imagen_fast.diffusion as diffusion_module
    from imagen_fast.train import Trainer
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="diffusion.t_max"):
            config_from_dict(_raw(tmp_path, bad))
    with pytest.raises(ValueError, match="diffusion.t_max=0.25: a base stage"):
        Trainer(config_from_dict(_raw(tmp_path / "base", 0.25, sr=False)))
    trainer = Trainer(config_from_dict(_raw(tmp_path / "run", 0.25)))
    ts = torch.cat([trainer._draws(True)["t"] for trainer.step in range(20)])
    assert ts.max() < 0.25 and ts.max() > 0.15
    # the same random numbers as t_max = 1, scaled: a run's other draws do not move
    full = Trainer(config_from_dict(_raw(tmp_path / "full", 1.0)))
    full.step = trainer.step = 3
    a, b = trainer._draws(True), full._draws(True)
    torch.testing.assert_close(a["t"], b["t"] * 0.25, rtol=0, atol=0)
    for name in ("noise", "drop", "aug_level", "aug_noise"):
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # its training-time grid samples from the truncated start (t_max), at the full 64 px
    trainer.step = 0
    starts = []

    def spy(*args, **kwargs):
        starts.append(kwargs["start"])
        return sample(*args, **kwargs)
    monkeypatch.setattr(diffusion_module, "sample", spy)
    summary = trainer.run()
    assert summary["step"] == 2 and starts == [0.25]
    from PIL import Image
    assert Image.open(tmp_path / "run" / "samples" / "step_00000002.png").size == (64, 64)
