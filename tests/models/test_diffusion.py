"""Diffusion: schedules, posterior, loss and conditioning, samplers, guidance,
thresholding, and a one-batch overfit of a tiny U-Net."""
import math

import pytest
import torch

from imagen_fast import ops
from imagen_fast.diffusion import (
    CosineSchedule,
    GaussianDiffusion,
    GuidedDenoiser,
    LinearSchedule,
    ddim_invert,
    get_schedule,
    sample,
)
from imagen_fast.models import build_unet

DATA_STD = 0.5


def gaussian_model(diffusion, std=DATA_STD):
    """The exact denoiser for data ~ N(0, std^2 I), in the diffusion's prediction."""
    def model(z, t, text_embeds=None, text_mask=None, **kw):
        a, s = diffusion.alpha_sigma(t.double())
        a = a.to(z.dtype).view(-1, 1, 1, 1)
        s = s.to(z.dtype).view(-1, 1, 1, 1)
        denom = a * a * std * std + s * s
        eps = s * z / denom
        if diffusion.prediction == "eps":
            return eps
        x0 = a * std * std * z / denom
        return a * eps - s * x0
    return model


class Spy:
    """A model that records its inputs and returns a fixed function of them."""

    def __init__(self, scale=1.0):
        self.calls = []
        self.scale = scale

    def __call__(self, z, t, text_embeds=None, text_mask=None, **kw):
        self.calls.append(dict(z=z.clone(), t=t.clone(), text=None if text_embeds is None else text_embeds.clone(),
                               mask=None if text_mask is None else text_mask.clone(), **kw))
        out = 0.1 * z
        if text_embeds is not None:
            out = out + self.scale * text_embeds.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return out


def tiny_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_unet("tiny-base32", image_size=16, attn_resolutions=[8], **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


# ----------------------------------------------------------------- schedules
@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_schedule_is_variance_preserving_and_monotone(name):
    sch = get_schedule(name)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    a, s = sch.alpha_sigma(t)
    torch.testing.assert_close(a * a + s * s, torch.ones_like(a))
    lam = sch.logsnr(t)
    assert (lam[1:] <= lam[:-1]).all() and (s > 0).all() and (a > 0).all()
    assert lam[0] == pytest.approx(20.0) and lam[-1] <= -9
    assert get_schedule(sch.config()).config() == sch.config()


def test_cosine_schedule_is_the_cosine_schedule():
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    a, _ = CosineSchedule().alpha_sigma(t)
    torch.testing.assert_close(a, torch.cos(0.5 * math.pi * t), atol=1e-4, rtol=0)


def test_linear_schedule_matches_ddpm_linear_betas():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    a, _ = LinearSchedule().alpha_sigma(t)
    torch.testing.assert_close(a * a, alpha_bar, rtol=1e-6, atol=0)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ddpm_posterior_matches_closed_form(schedule):
    """q(z_s | z_t, x0) vs Ho et al. (2020) eq. 7 written with alpha_bar = alpha^2."""
    d = GaussianDiffusion(schedule)
    g = torch.Generator().manual_seed(0)
    n = 6
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.1
    s = t * torch.rand(n, generator=g, dtype=torch.float64)
    x0 = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    z = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    mean, var = d.q_posterior(x0, z, t, s)
    ab_t = d.alpha_sigma(t)[0] ** 2
    ab_s = d.alpha_sigma(s)[0] ** 2
    beta = 1 - ab_t / ab_s
    v = lambda u: u.view(-1, 1, 1, 1)  # noqa: E731
    mean_ref = v(ab_s.sqrt() * beta / (1 - ab_t)) * x0 + v((1 - beta).sqrt() * (1 - ab_s) / (1 - ab_t)) * z
    var_ref = (1 - ab_s) / (1 - ab_t) * beta
    torch.testing.assert_close(mean, mean_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(var.flatten(), var_ref, rtol=1e-9, atol=1e-12)
    # and one ancestral sampler step with zero noise lands on that mean
    alpha_t, sigma_t = d.alpha_sigma(t)
    alpha_s, sigma_s = d.alpha_sigma(s)
    eps = (z - v(alpha_t) * x0) / v(sigma_t)                  # the eps that implies x0
    step = ops.sampler_step(z, eps, alpha_t=alpha_t, sigma_t=sigma_t, alpha_s=alpha_s,
                            sigma_s=sigma_s, sampler="ddpm", noise=torch.zeros_like(z),
                            threshold="none")
    torch.testing.assert_close(step, mean_ref, rtol=1e-7, atol=1e-7)


# ----------------------------------------------------------------- training
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_target(prediction):
    d = GaussianDiffusion("cosine", prediction=prediction, cond_drop_prob=0.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 3, 8, 8, generator=g)
    noise = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    a, s = (u.float().view(-1, 1, 1, 1) for u in d.alpha_sigma(t))
    target = noise if prediction == "eps" else a * noise - s * x0
    perfect = lambda z, tt, *args, **kw: target  # noqa: E731
    assert d.loss(perfect, x0, t=t, noise=noise).item() < 1e-10
    zero = lambda z, tt, *args, **kw: torch.zeros_like(z)  # noqa: E731
    torch.testing.assert_close(d.loss(zero, x0, t=t, noise=noise, reduction="none"),
                               target.square().mean(dim=(1, 2, 3)))
    # x0 / eps recovery from the prediction is exact
    z = a * x0 + s * noise
    torch.testing.assert_close(d.predict_x0(z, target, t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d.predict_eps(z, target, t), noise, rtol=1e-4, atol=1e-4)


def test_text_dropout_zeroes_and_masks():
    spy = Spy()
    x0 = torch.zeros(64, 3, 4, 4)
    text = torch.randn(64, 5, 8)
    mask = torch.ones(64, 5, dtype=torch.bool)
    mask[:, 3:] = False
    GaussianDiffusion(cond_drop_prob=1.0).loss(spy, x0, text, mask)
    assert not spy.calls[-1]["mask"].any() and not spy.calls[-1]["text"].any()
    GaussianDiffusion(cond_drop_prob=0.0).loss(spy, x0, text, mask)
    assert torch.equal(spy.calls[-1]["mask"], mask) and torch.equal(spy.calls[-1]["text"], text)
    GaussianDiffusion(cond_drop_prob=0.1).loss(spy, x0, text, None, generator=torch.Generator().manual_seed(0))
    dropped = ~spy.calls[-1]["mask"].any(dim=1)
    assert 1 <= dropped.sum() <= 20                              # ~10% of 64
    assert not spy.calls[-1]["text"][dropped].any() and spy.calls[-1]["text"][~dropped].any()


def test_noise_augmentation_in_training_and_sampling():
    spy = Spy()
    d = GaussianDiffusion(noise_aug=True, aug_level_max=0.5, cond_drop_prob=0.0)
    x0 = torch.zeros(32, 3, 8, 8)
    lowres = torch.full((32, 3, 4, 4), 0.7)
    d.loss(spy, x0, None, None, lowres, generator=torch.Generator().manual_seed(0))
    call = spy.calls[-1]
    level = call["aug_level"]
    assert level.shape == (32,) and (level >= 0).all() and (level <= 0.5).all() and level.std() > 0.05
    assert not torch.equal(call["lowres"], lowres)              # noised
    # fixed level at sampling; level 0 leaves the image untouched
    for fixed in (0.0, 0.3):
        sample(spy, d, (2, 3, 8, 8), lowres=lowres[:2], aug_level=fixed, steps=2, sampler="ddim")
        call = spy.calls[-1]
        assert torch.equal(call["aug_level"], torch.full((2,), fixed))
        if fixed == 0.0:
            assert torch.equal(call["lowres"], lowres[:2])
        else:
            assert not torch.equal(call["lowres"], lowres[:2])
    # the same noised low-res image is used at every step
    assert torch.equal(spy.calls[-1]["lowres"], spy.calls[-2]["lowres"])


def test_one_batch_overfit_loss_falls_10x():
    """Loss falls 10x within a step budget (a few seconds of a quiet 2-core CPU; counted in
    steps, not seconds, so a loaded machine cannot fail it)."""
    torch.manual_seed(0)
    model = build_unet("tiny-base32", image_size=16, attn_resolutions=[8])
    d = GaussianDiffusion("cosine", cond_drop_prob=0.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    text = torch.randn(2, 6, 32, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = last = None
    for step in range(OVERFIT_STEPS):
        loss = d.loss(model, x0, text, mask, t=t, noise=noise)
        first = first if first is not None else loss.item()
        last = loss.item()
        assert math.isfinite(last)
        if last < first / 10:
            print(f"loss fell 10x in {step} steps")
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert last < first / 10, f"loss {first:.3g} -> {last:.3g} in {OVERFIT_STEPS} steps"


OVERFIT_STEPS = 300


# ------------------------------------------------------------------ sampling
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ddim_eta0_is_deterministic_and_inverts(schedule, prediction):
    d = GaussianDiffusion(schedule, prediction=prediction)
    model = gaussian_model(d)
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * DATA_STD
    errs = []
    for steps in (100, 200):
        z1 = ddim_invert(model, d, x0, steps=steps)
        back = sample(model, d, x0.shape, noise=z1, sampler="ddim", eta=0.0, steps=steps,
                      threshold="none")
        errs.append((back - x0).abs().mean().item())
        assert (back - x0).abs().max() < 0.12
    assert errs[0] < 0.03
    assert errs[1] < 0.6 * errs[0]                  # first-order: the error halves with 2x steps
    again = sample(model, d, x0.shape, noise=z1, sampler="ddim", eta=0.0, steps=200,
                   threshold="none", generator=torch.Generator().manual_seed(123))
    assert torch.equal(back, again)


def test_ddim_eta0_deterministic_with_unet_and_guidance():
    model = tiny_unet()
    d = GaussianDiffusion()
    text = torch.randn(2, 5, 32)
    z1 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(text_embeds=text, guidance=3.0, sampler="ddim", eta=0.0, steps=4, noise=z1)
    a = sample(model, d, z1.shape, generator=torch.Generator().manual_seed(5), **kw)
    b = sample(model, d, z1.shape, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b)
    c = sample(model, d, z1.shape, generator=torch.Generator().manual_seed(6), **dict(kw, eta=1.0))
    assert not torch.equal(a, c)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_samplers_reach_the_data_distribution(sampler):
    d = GaussianDiffusion("cosine")
    steps = {"ddpm": 200, "ddim": 100, "dpmpp2m": 12}[sampler]
    x = sample(gaussian_model(d), d, (256, 1, 8, 8), sampler=sampler, steps=steps,
               threshold="none", generator=torch.Generator().manual_seed(0))
    assert abs(x.std().item() - DATA_STD) < 0.03, x.std().item()
    assert abs(x.mean().item()) < 0.02


def test_dpmpp2m_beats_ddim_at_few_steps():
    d = GaussianDiffusion("cosine")
    model = gaussian_model(d)
    x0 = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * DATA_STD
    z1 = ddim_invert(model, d, x0, steps=400)
    errs = {s: (sample(model, d, x0.shape, noise=z1, sampler=s, steps=10, threshold="none")
                - x0).abs().mean().item() for s in ("ddim", "dpmpp2m")}
    assert errs["dpmpp2m"] < 0.5 * errs["ddim"], errs


class CountingModel:
    def __init__(self, model):
        self.model = model
        self.batches = []

    def __call__(self, z, t, *args, **kw):
        self.batches.append(z.shape[0])
        return self.model(z, t, *args, **kw)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_guidance_is_one_batched_forward_per_step(sampler):
    d = GaussianDiffusion()
    counting = CountingModel(Spy())
    text = torch.randn(3, 4, 8)
    sample(counting, d, (3, 3, 8, 8), text_embeds=text, guidance=5.0, steps=5, sampler=sampler)
    assert counting.batches == [6] * 5
    spy = counting.model
    call = spy.calls[-1]
    assert torch.equal(call["text"][:3], text) and not call["text"][3:].any()
    assert call["mask"][:3].all() and not call["mask"][3:].any()
    counting.batches.clear()
    sample(counting, d, (3, 3, 8, 8), text_embeds=text, guidance=1.0, steps=5, sampler=sampler)
    assert counting.batches == [3] * 5                       # no unconditional branch at w = 1


def test_guidance_combine_is_w_cond_plus_1_minus_w_uncond():
    d = GaussianDiffusion()
    spy = Spy(scale=1.0)
    text = torch.randn(2, 4, 8) + 1.0
    z = torch.randn(2, 3, 8, 8)
    den = GuidedDenoiser(spy, 2, text, None, 4.0)
    cond, uncond = den(z, 0.5)
    w = 4.0
    a, s = (float(v) for v in d.alpha_sigma(torch.tensor(0.5, dtype=torch.float64)))
    a2, s2 = (float(v) for v in d.alpha_sigma(torch.tensor(0.25, dtype=torch.float64)))
    got = ops.sampler_step(z, cond, uncond, guidance_scale=w, alpha_t=a, sigma_t=s, alpha_s=a2,
                           sigma_s=s2, sampler="ddim", eta=0.0, threshold="none")
    eps = w * cond + (1 - w) * uncond
    x0 = (z - s * eps) / a
    want = a2 * x0 + s2 * eps
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_high_guidance_with_dynamic_thresholding_stays_in_range(sampler):
    model = tiny_unet()
    d = GaussianDiffusion()
    text = torch.randn(2, 5, 32) * 3
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2:] = False
    x = sample(model, d, (2, 3, 16, 16), text_embeds=text, text_mask=mask, guidance=20.0,
               steps=4, sampler=sampler, threshold="dynamic", percentile=0.995,
               generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    assert x.abs().max() <= 1.0 + 1e-6
    # without thresholding the same run leaves the range (guidance 20 on an untrained net)
    y = sample(model, d, (2, 3, 16, 16), text_embeds=text, text_mask=mask, guidance=20.0,
               steps=4, sampler=sampler, threshold="none", generator=torch.Generator().manual_seed(0))
    assert y.abs().max() > 1.0


def test_sampling_with_fully_dropped_text_is_finite():
    model = tiny_unet()
    d = GaussianDiffusion()
    text = torch.zeros(2, 5, 32)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    for w in (1.0, 7.0):
        x = sample(model, d, (2, 3, 16, 16), text_embeds=text, text_mask=mask, guidance=w,
                   steps=3, sampler="ddpm", generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all()


def test_bad_sampler_arguments():
    d = GaussianDiffusion()
    with pytest.raises(ValueError, match="sampler"):
        sample(Spy(), d, (1, 3, 4, 4), sampler="euler")
    with pytest.raises(ValueError, match="threshold"):
        sample(Spy(), d, (1, 3, 4, 4), threshold="soft")
    with pytest.raises(ValueError, match="steps"):
        sample(Spy(), d, (1, 3, 4, 4), steps=0)
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(prediction="x0")
