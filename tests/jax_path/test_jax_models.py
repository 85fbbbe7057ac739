"""The Flax U-Nets are the torch U-Nets: exact weight conversion both ways, the same
outputs for the same weights and inputs (every small preset), the same loss for the
same draws, the same samples for the same noise; cascade checkpoints shared; the
JAX schedules and step coefficients against torch's; the whole model lowers to
Mosaic kernels for TPU."""
import numpy as np
import pytest
import torch
from flax import nnx
from support.jax_util import jax, jnp
from support.models import make_inputs, randomize_output

from imagen_fast.diffusion import GaussianDiffusion, sample
from imagen_fast.jax import convert
from imagen_fast.jax import diffusion as jdiff
from imagen_fast.jax.models import AttentionBlock, GroupNormAct
from imagen_fast.jax.models import build_unet as jax_unet
from imagen_fast.models import build_unet
from imagen_fast.ops import step_coefficients
from imagen_fast.cascade import ImagenCascade

# base64-small is the ADM architecture of tiny-base32 at 22M parameters: its compile
# dominates the suite, so it runs with IMAGEN_FAST_SLOW=1 (passes, rel. error 3e-6).
PRESETS = ["tiny-base32", "tiny-sr64", "tiny-sr128",
           pytest.param("base64-small", marks=pytest.mark.slow), "base64-small-efficient"]


def nhwc(t):
    return None if t is None else jnp.asarray(t.movedim(1, -1).numpy())


def nchw(a):
    return torch.from_numpy(np.array(a)).movedim(-1, 1)


def jitted(model):
    """model(*args, **kw) compiled, parameters passed as an argument (no constants)."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, *a, **kw: nnx.merge(graphdef, state)(*a, **kw))
    return lambda *a, **kw: run(state, *a, **kw)


def torch_model(name, seed=1):
    torch.manual_seed(seed)
    return randomize_output(build_unet(name), seed=seed).eval()


def rel_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", PRESETS)
def test_flax_forward_equals_torch(name):
    model = torch_model(name)
    x, t, text, mask, kw = make_inputs(model, batch=2, length=7)
    with torch.no_grad():
        ref = model(x, t, text, mask, **kw)
    flax_model = convert.from_torch(model)
    jkw = {} if not kw else dict(lowres=nhwc(kw["lowres"]), aug_level=jnp.asarray(kw["aug_level"].numpy()))
    out = jitted(flax_model)(nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(text.numpy()),
                             jnp.asarray(mask.numpy()), **jkw)
    out = nchw(out)
    assert out.shape == ref.shape
    assert ref.abs().max() > 0.5                      # the output depends on the weights
    assert rel_error(out, ref) < 1e-4, rel_error(out, ref)


def test_weight_conversion_is_exact_both_ways():
    model = torch_model("tiny-sr64")
    flax_model = convert.from_torch(model)
    back = convert.state_dict(flax_model)
    ref = model.state_dict()
    assert set(back) == set(ref)
    for key, value in ref.items():
        assert np.array_equal(back[key], value.numpy()), key
    # the layouts really differ where torch's and JAX's conventions do
    assert flax_model.input_conv.weight.shape == (3, 3, 6, 16)
    assert flax_model.ublocks[0].up_conv.weight.shape == (3, 3, 64, 32)
    assert flax_model.cond.text_proj.weight.shape == (32, 32)
    again = convert.to_torch(flax_model)
    for key, value in again.state_dict().items():
        assert torch.equal(value, ref[key]), key


def test_conversion_refuses_another_architecture():
    flax_model = jax_unet("tiny-sr64")
    with pytest.raises(ValueError, match="missing") as err:
        convert.load_state_dict(flax_model, build_unet("tiny-sr128").state_dict(), what="sr128")
    assert "sr128" in str(err.value)
    other = build_unet("tiny-sr64", channels=[16, 32, 48])
    with pytest.raises(ValueError, match="other shapes"):
        convert.load_state_dict(flax_model, other.state_dict())


def test_cascade_checkpoints_are_shared(tmp_path):
    torch.manual_seed(0)
    cascade = ImagenCascade.from_presets(["tiny-base32", "tiny-sr64"])
    cascade.save(str(tmp_path / "torch"))
    stages = convert.load_cascade(str(tmp_path / "torch"))
    assert [st["name"] for st in stages] == [st.name for st in cascade.stages]
    assert stages[1]["sampling"]["guidance"] == 8.0
    for st, torch_stage in zip(stages, cascade.stages):
        for key, value in convert.state_dict(st["model"]).items():
            assert np.array_equal(value, torch_stage.unet.state_dict()[key].numpy()), key
    # written from JAX, read by torch
    first = stages[0]["model"].input_conv.weight
    first[...] = first[...] + 1.0
    convert.save_cascade(str(tmp_path / "jax"), stages)
    loaded = ImagenCascade.load(str(tmp_path / "jax"))
    delta = loaded.stages[0].unet.input_conv.weight - cascade.stages[0].unet.input_conv.weight
    assert torch.allclose(delta, torch.ones_like(delta))
    assert loaded.config() == cascade.config()


# ------------------------------------------------------------------- diffusion
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedules_match_torch(schedule):
    gd = GaussianDiffusion(schedule)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    alpha, sigma = gd.alpha_sigma(t)
    a64, s64 = jdiff.alpha_sigma(gd.schedule.config(), t.numpy(), xp=np)
    # torch's closed-form linear integral cancels to ~3e-8 near t = 0 (ours is exact)
    assert np.allclose(a64, alpha.numpy(), rtol=1e-7, atol=0)
    assert np.allclose(s64, sigma.numpy(), rtol=1e-7, atol=0)
    t32 = t.float()                               # float32 times, compared at the same times
    alpha, sigma = gd.alpha_sigma(t32.double())
    a32, s32 = jdiff.alpha_sigma(gd.schedule.config(), jnp.asarray(t32.numpy()))
    assert np.allclose(np.asarray(a32), alpha.numpy(), rtol=5e-6, atol=0)
    assert np.allclose(np.asarray(s32), sigma.numpy(), rtol=5e-6, atol=0)


@pytest.mark.parametrize("sampler,eta,prediction", [("ddpm", 0.0, "eps"), ("ddim", 0.0, "v"),
                                                    ("ddim", 0.7, "eps")])
def test_step_coefficients_match_torch(sampler, eta, prediction):
    for a_t, s_t, a_s, s_s in [(0.6, 0.8, 0.8, 0.6), (0.1, 0.995, 1.0, 0.0)]:
        ref = step_coefficients(*(torch.tensor([v], dtype=torch.float64) for v in (a_t, s_t, a_s, s_s)),
                                sampler=sampler, eta=eta, prediction=prediction)[0]
        ours = jdiff.step_coefficients(a_t, s_t, a_s, s_s, sampler=sampler, eta=eta,
                                       prediction=prediction)
        assert np.allclose(ours, ref.numpy(), rtol=1e-12, atol=1e-15)


def test_loss_equals_torch_for_the_same_draws():
    model = torch_model("tiny-sr64")
    gd = GaussianDiffusion("cosine", prediction="v", noise_aug=True)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    lowres = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    text = torch.randn(3, 6, 32, generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 4:] = False
    draws = dict(t=torch.rand(3, generator=g, dtype=torch.float64), noise=torch.randn(3, 3, 64, 64, generator=g),
                 drop=torch.tensor([False, True, False]), aug_level=torch.tensor([0.0, 0.3, 0.7], dtype=torch.float64),
                 aug_noise=torch.randn(3, 3, 32, 32, generator=g))
    with torch.no_grad():
        ref = gd.loss(model, x0, text, mask, lowres, reduction="none", **draws)
    jd = jdiff.Diffusion(gd.config())
    jdraws = jdiff.Draws(t=jnp.asarray(draws["t"].numpy(), jnp.float32), noise=nhwc(draws["noise"]),
                         drop=jnp.asarray(draws["drop"].numpy()),
                         aug_level=jnp.asarray(draws["aug_level"].numpy(), jnp.float32),
                         aug_noise=nhwc(draws["aug_noise"]))
    graphdef, state = nnx.split(convert.from_torch(model))
    loss = jax.jit(lambda state, *a: jd.loss(nnx.merge(graphdef, state), *a, reduction="none"))(
        state, nhwc(x0), jnp.asarray(text.numpy()), jnp.asarray(mask.numpy()), nhwc(lowres), jdraws)
    assert np.allclose(np.asarray(loss), ref.numpy(), rtol=2e-5, atol=0)


@pytest.mark.parametrize("name,sampler,start", [("tiny-base32", "ddpm", 1.0), ("tiny-sr64", "dpmpp2m", 1.0),
                                                ("tiny-sr64", "ddpm", 0.4)])
def test_samples_equal_torch_for_the_same_noise(name, sampler, start):
    """Guided (one 2B forward per step), dynamic thresholding, the same starting noise,
    low-res augmentation noise and per-step noise (replayed from torch's generator); an
    SR stage also from a truncated start (its bicubic-upsampled input diffused to 0.4)."""
    model = torch_model(name)
    sr = model.config["stage"] == "sr"
    gd = GaussianDiffusion("cosine", noise_aug=sr)
    b, res, steps = 2, model.config["image_size"], 4
    g = torch.Generator().manual_seed(0)
    text = torch.randn(b, 5, model.config["text_dim"], generator=g)
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[1, 2:] = False
    lowres = (torch.rand(b, 3, res // 2, res // 2, generator=g) * 2 - 1) if sr else None
    settings = dict(aug_level=0.2, guidance=4.0, sampler=sampler, steps=steps, start=start)
    with torch.no_grad():
        ref = sample(model, gd, (b, 3, res, res), text_embeds=text, text_mask=mask, lowres=lowres,
                     generator=torch.Generator().manual_seed(5), **settings)
    replay = torch.Generator().manual_seed(5)                 # torch's draws, in its order
    z1 = torch.randn(b, 3, res, res, generator=replay)
    aug_noise = torch.randn(lowres.shape, generator=replay) if sr else None
    step_noise = None
    if sampler == "ddpm":                                     # the last step draws nothing
        step_noise = jnp.stack([nhwc(torch.randn(b, 3, res, res, generator=replay))
                                for _ in range(steps - 1)] + [jnp.zeros((b, res, res, 3))])
    graphdef, state = nnx.split(convert.from_torch(model))
    jd = jdiff.Diffusion(gd.config())
    run = jax.jit(lambda state, z1, text, mask, lowres, aug_noise, step_noise: jdiff.sample(
        nnx.merge(graphdef, state), jd, z1.shape, noise=z1, text_embeds=text, text_mask=mask,
        lowres=lowres, aug_noise=aug_noise, step_noise=step_noise, **settings))
    out = nchw(run(state, nhwc(z1), jnp.asarray(text.numpy()), jnp.asarray(mask.numpy()),
                   nhwc(lowres), nhwc(aug_noise), step_noise))
    assert ref.abs().max() > 0.5
    assert (out - ref).abs().max() < 1e-4


def test_sampler_loop_is_traced_once():
    calls = []

    def model_fn(z, t, text, mask):
        calls.append(z.shape)
        return z * 0.5 + mask[:, :1, None, None] * 0.1

    jd = jdiff.Diffusion(GaussianDiffusion("cosine").config())
    text, mask = jnp.ones((2, 4, 8)), jnp.ones((2, 4), bool)
    jaxpr = jax.make_jaxpr(lambda key: jdiff.sample(model_fn, jd, (2, 8, 8, 3), key=key,
                                                    text_embeds=text, text_mask=mask,
                                                    guidance=3.0, steps=50))(jax.random.key(0))
    assert calls == [(4, 8, 8, 3)]               # one traced model call, batch 2B
    assert "scan" in str(jaxpr)
    # exported for TPU, the loop's dynamic thresholding is the sort-free Pallas kernel
    loop = jax.jit(lambda seed: jdiff.sample(model_fn, jd, (2, 8, 8, 3), key=jax.random.key(seed),
                                             text_embeds=text, text_mask=mask, guidance=3.0,
                                             steps=50))
    tpu = jax.export.export(loop, platforms=["tpu"])(jax.ShapeDtypeStruct((), jnp.uint32)).mlir_module()
    assert tpu.count("tpu_custom_call") == 1 and "sort" not in tpu.replace("tpu_custom_call", "")
    with pytest.raises(ValueError, match="sampler"):
        jdiff.sample(model_fn, jd, (2, 8, 8, 3), sampler="euler")


def test_the_whole_model_lowers_to_mosaic_kernels_for_tpu():
    """Every normalisation and attention of the U-Net (the text pooling's single
    query included) picks its Pallas kernel when exported for TPU, none for CPU.
    (The kernels' backward lowering is checked per op in test_jax_ops.)"""
    model = jax_unet("tiny-sr64")
    graphdef, params = nnx.split(model)

    def forward(params, x, t, text, mask, lowres):
        return nnx.merge(graphdef, params)(x, t, text, mask, lowres=lowres, aug_level=t)

    args = (params, jnp.ones((2, 64, 64, 3)), jnp.ones((2,)), jnp.ones((2, 8, 32)),
            jnp.ones((2, 8), bool), jnp.ones((2, 32, 32, 3)))
    specs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    tpu = jax.export.export(jax.jit(forward), platforms=["tpu"])(*specs).mlir_module()
    cpu = jax.export.export(jax.jit(forward), platforms=["cpu"])(*specs).mlir_module()
    norms = sum(isinstance(m, GroupNormAct) for _, m in nnx.iter_modules(model))
    attentions = 1 + sum(isinstance(m, AttentionBlock) for _, m in nnx.iter_modules(model))
    assert tpu.count("tpu_custom_call") == 2 * norms + attentions
    assert "tpu_custom_call" not in cpu


def test_jax_cascade_samples_a_torch_checkpoint(tmp_path):
    """Text from the host encoder, the base stage's images condition the SR stage,
    each stage with its own stored sampling settings (overridable)."""
    from imagen_fast.jax.cascade import JaxCascade, to_uint8

    torch.manual_seed(0)
    ImagenCascade.from_presets(["tiny-base32", "tiny-sr64"]).save(str(tmp_path))
    cascade = JaxCascade.load(str(tmp_path))
    emb, mask = cascade.encode(["two red circles", "a blue square"], encoder="hash:32", max_length=8)
    assert emb.shape == (2, 8, 32) and mask.dtype == bool
    fast = [{"steps": 2, "sampler": "ddim"}, {"steps": 2}]
    base, sr = cascade.sample(emb, mask, key=jax.random.key(1), sampling=fast, return_all=True)
    assert base.shape == (2, 32, 32, 3) and sr.shape == (2, 64, 64, 3)
    assert float(jnp.abs(sr).max()) <= 1.0 and to_uint8(sr).dtype == np.uint8
    again = cascade.sample(emb, mask, key=jax.random.key(1), sampling=fast)
    assert jnp.array_equal(again, sr)                    # compiled once, deterministic per key
    with pytest.raises(ValueError, match="unknown sampling"):
        cascade.sample(emb, mask, sampling=[{"step": 2}])
    with pytest.raises(ValueError, match="text_dim"):
        cascade.sample(jnp.ones((1, 4, 16)))
