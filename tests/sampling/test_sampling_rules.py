"""One set of rules for sampling settings (imagen_fast.core.SamplingConfig), applied alike
by the CLI, load_pipeline's pipeline, the eval systems and the JAX cascade; the old
spelling guidance_scale read from stored configs; the shared time grid, coefficients and
schedules agree across numpy, torch and JAX."""
import numpy as np
import pytest
import torch

from imagen_fast import core
from imagen_fast.core import SamplingConfig
from imagen_fast.eval.generator import System
from imagen_fast.cascade import ImagenCascade
from imagen_fast.pipeline import ImagenPipeline
from imagen_fast.sample_cli import _per_stage
from imagen_fast.text import get_text_encoder

BAD = [("guidance", -1.0), ("steps", 0), ("steps", 2.5), ("sampler", "euler"), ("threshold", "soft"),
       ("percentile", 0.0), ("percentile", 1.5), ("eta", 1.5), ("aug_level", -0.1),
       ("start", 0.0), ("start", 1.5)]
GOOD = [("guidance", 0.0), ("guidance", 7), ("steps", 1), ("sampler", "dpmpp"), ("threshold", "none"),
        ("percentile", 1.0), ("eta", 1.0), ("aug_level", 0.0), ("start", 0.25), ("start", 1.0)]


@pytest.fixture(scope="module")
def pipe():
    cascade = ImagenCascade.from_presets(("tiny-base32",), names=["base"])
    return ImagenPipeline(cascade, get_text_encoder("hash:32", max_length=8), torch.device("cpu"))


def _entry_points(pipe):
    """Each place a user gives sampling settings, as f(name, value) that raises or not."""
    return {
        "SamplingConfig": lambda k, v: SamplingConfig(**{k: v}),
        "pipeline": lambda k, v: pipe.settings(**{k: v}),
        "eval system": lambda k, v: System("s", lambda prompts, **kw: [], {k: v}),
        "cli": lambda k, v: _per_stage(str(v), k, {float: float, int: int, str: str}[type(v)]),
    }


@pytest.mark.parametrize("name,value", BAD)
def test_every_entry_point_refuses_the_same_settings(pipe, name, value):
    for where, call in _entry_points(pipe).items():
        if where == "cli" and name == "steps" and isinstance(value, float):
            continue                        # the CLI reads steps as an int: "2.5" cannot be read
        with pytest.raises(ValueError, match=name.replace("_", ".")):
            call(name, value)


@pytest.mark.parametrize("name,value", GOOD)
def test_every_entry_point_accepts_the_same_settings(pipe, name, value):
    for call in _entry_points(pipe).values():
        call(name, value)
    assert getattr(SamplingConfig(**{name: value}), name) == (
        "dpmpp2m" if value == "dpmpp" else value)


def test_the_jax_cascade_uses_the_same_rules():
    jax = pytest.importorskip("jax")
    from imagen_fast.jax.cascade import JaxCascade

    class Model:                            # checked before anything is compiled
        config = {"text_dim": 8, "image_size": 8}

    cascade = JaxCascade([{"model": Model(), "diffusion": {}, "sampling": {"guidance_scale": 3.0}}])
    text = jax.numpy.zeros((1, 4, 8))
    for name, value in BAD:
        with pytest.raises((ValueError, TypeError), match=name):
            cascade.sample(text, sampling=[{name: value}])
    with pytest.raises(ValueError, match="now 'guidance'"):
        cascade.sample(text, sampling=[{"guidance_scale": 2.0}])


def test_stored_configs_read_the_old_spelling():
    assert SamplingConfig.from_dict({"guidance_scale": 7.0, "steps": 8}).guidance == 7.0
    assert SamplingConfig.from_dict({"guidance": 3}).to_dict()["guidance"] == 3.0
    with pytest.raises(ValueError, match="both"):
        SamplingConfig.from_dict({"guidance": 3, "guidance_scale": 3})
    with pytest.raises(ValueError, match="unknown"):
        SamplingConfig.from_dict({"cfg": 3})


def test_time_grid_and_coefficients_are_one_definition():
    assert core.time_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    schedule = core.schedule_config("cosine")
    assert core.alpha_sigma_at(schedule, 0.0) == (1.0, 0.0)
    a_t, s_t = core.alpha_sigma_at(schedule, 0.75)
    a_s, s_s = core.alpha_sigma_at(schedule, 0.5)
    np_coefs = core.step_coefficients(np.float64(a_t), np.float64(s_t), np.float64(a_s), np.float64(s_s),
                                      sampler="ddim", eta=0.3)
    torch_coefs = core.step_coefficients(*(torch.tensor([v], dtype=torch.float64) for v in (a_t, s_t, a_s, s_s)),
                                         sampler="ddim", eta=0.3, xp=torch)
    np.testing.assert_array_equal(np.array(np_coefs), torch.cat(torch_coefs).numpy())


@pytest.mark.parametrize("name", core.SCHEDULES)
def test_schedules_agree_across_array_libraries(name):
    t = np.linspace(0.0, 1.0, 101)
    lam_np = core.logsnr(name, t)
    lam_torch = core.logsnr(name, torch.tensor(t), xp=torch).numpy()
    np.testing.assert_allclose(lam_torch, lam_np, rtol=1e-12, atol=1e-12)
    assert np.all(np.diff(lam_np) <= 0) and np.isclose(lam_np[0], 20.0) and lam_np[-1] >= -20.0
    jnp = pytest.importorskip("jax.numpy")
    lam_jnp = np.asarray(core.logsnr(name, jnp.asarray(t, jnp.float32), xp=jnp))
    a_np, _ = core.alpha_sigma(name, t)
    a_jnp, _ = core.alpha_sigma(name, jnp.asarray(t, jnp.float32), xp=jnp)
    np.testing.assert_allclose(np.asarray(a_jnp), a_np, rtol=0, atol=1e-6)
    assert np.isfinite(lam_jnp).all()
