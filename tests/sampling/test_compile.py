"""Compiled denoising steps (imagen_fast.diffusion.step): the whole guided step is one
torch.compile graph (fullgraph) per run for every sampler and stage, a run never
recompiles, a second run reuses the graph, and a seed gives the eager images (same
generator draws). Most tests compile with dynamo's "eager" backend (the graph capture,
which is what fullgraph and recompiles are about, at a fraction of inductor's compile
time); one runs inductor, and IMAGEN_FAST_SLOW=1 runs inductor for every sampler and
stage."""
import pytest
import torch
from torch._dynamo.utils import counters

from imagen_fast import ImagenCascade
from imagen_fast.cascade import Stage
from imagen_fast.core import SamplingConfig
from imagen_fast.diffusion import GaussianDiffusion, sample
from imagen_fast.diffusion.step import compile_options, compiled_steps, graphs_compiled, uses_cudagraphs
from imagen_fast.models import build_unet
from imagen_fast.pipeline import ImagenPipeline, load_pipeline
from imagen_fast.text import get_text_encoder

CAPTURE = {"backend": "eager"}          # dynamo's graph capture, no code generation
SAMPLERS = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("dpmpp2m", 0.0)]
STEPS = 4


def _models():
    torch.manual_seed(0)
    base = build_unet("tiny-base32", image_size=16, model_channels=16, channel_mult=[1],
                      attn_resolutions=[16], text_dim=16, context_dim=16, emb_dim=32, groups=4,
                      head_dim=8).eval()
    sr = build_unet("tiny-sr64", image_size=16, lowres_size=8, channels=[8, 16], num_res_blocks=[1, 1],
                    self_attention=[False, True], cross_attention=[False, False], text_dim=16,
                    context_dim=16, emb_dim=32, groups=4, num_heads=2).eval()
    return {"base": base, "sr": sr}


MODELS = _models()


def _run(stage, sampler, eta, compile, *, threshold="dynamic", guidance=4.0):
    """(images, the generator's next draw, the on_step calls) of one seeded run."""
    g = torch.Generator().manual_seed(5)
    data = torch.Generator().manual_seed(1)
    text = torch.randn(2, 6, 16, generator=data)
    mask = torch.arange(6)[None] < torch.tensor([[6], [3]])
    lowres = torch.rand(2, 3, 8, 8, generator=data) * 2 - 1 if stage == "sr" else None
    seen = []
    x = sample(MODELS[stage], GaussianDiffusion(noise_aug=stage == "sr"), (2, 3, 16, 16),
               text_embeds=text, text_mask=mask, lowres=lowres, aug_level=0.25 if lowres is not None else 0.0,
               guidance=guidance, sampler=sampler, eta=eta, steps=STEPS, threshold=threshold,
               generator=g, compile=compile, on_step=lambda done, total: seen.append((done, total)))
    return x, torch.randn(3, generator=g), seen


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("stage", ["base", "sr"])
@pytest.mark.parametrize("sampler,eta", SAMPLERS)
def test_a_run_is_one_graph_never_recompiled_with_the_eager_images(stage, sampler, eta):
    want, want_next, _ = _run(stage, sampler, eta, "none")
    before, steps_before = _graphs(), len(compiled_steps(MODELS[stage]))
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = _run(stage, sampler, eta, CAPTURE)
        # one graph serves every step; ddpm and ddim with eta > 0 share it (the sampler is
        # in the coefficient rows), so a run may find its graph already compiled
        new = len(compiled_steps(MODELS[stage])) - steps_before
        assert new in (0, 1) and _graphs() == before + new
        second = _run(stage, sampler, eta, CAPTURE)
        assert _graphs() == before + new                  # a second run compiles nothing
    assert all(graphs_compiled(step) == 1 for step in compiled_steps(MODELS[stage]).values())
    for x, draw, seen in (first, second):
        torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(draw, want_next)               # the same noise was drawn, no more
        assert seen == [(i, STEPS) for i in range(1, STEPS + 1)]    # progress after every step


def test_inductor_step_matches_eager():
    want, want_next, _ = _run("base", "ddpm", 0.0, "none")
    with torch._dynamo.config.patch(error_on_recompile=True):
        got, got_next, seen = _run("base", "ddpm", 0.0, "default")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got_next, want_next) and len(seen) == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["base", "sr"])
@pytest.mark.parametrize("sampler,eta", SAMPLERS)
def test_inductor_matches_eager_for_every_sampler_and_stage(stage, sampler, eta):
    want, _, _ = _run(stage, sampler, eta, "none", threshold="static")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for compile in ("default", "reduce-overhead"):    # reduce-overhead: no CUDA graphs on a CPU
            got, _, _ = _run(stage, sampler, eta, compile, threshold="static")
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_new_settings_compile_their_own_graph_not_a_recompile():
    model = MODELS["base"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        _run("base", "ddim", 0.0, CAPTURE, guidance=2.0)
        _run("base", "ddim", 0.0, CAPTURE, threshold="none")
    specs = {(key[0].guidance, key[0].threshold) for key in compiled_steps(model)}
    assert {(2.0, "dynamic"), (4.0, "none")} <= specs


def test_cascade_and_pipeline_compile_each_stage_once():
    base, sr = MODELS["base"], MODELS["sr"]
    cascade = ImagenCascade([
        Stage("base", base, GaussianDiffusion(), SamplingConfig(steps=3, guidance=3.0)),
        Stage("sr", sr, GaussianDiffusion(noise_aug=True), SamplingConfig(steps=2, guidance=2.0,
                                                                            aug_level=0.2)),
    ])
    pipe = ImagenPipeline(cascade, get_text_encoder("hash:16", max_length=6), torch.device("cpu"),
                          compile=CAPTURE)
    eager = ImagenPipeline(cascade, pipe.text_encoder, torch.device("cpu"))
    want = eager(["a red circle", "two squares"], seed=3, return_tensors=True)
    before = _graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            got = pipe(["a red circle", "two squares"], seed=3, return_tensors=True)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert _graphs() == before + 2                        # one per stage, over both calls


def test_compile_settings_are_checked():
    assert compile_options("none") is None and compile_options(False) is None
    assert compile_options(True) == {} and compile_options("default") == {}
    assert compile_options("reduce-overhead") == {"mode": "reduce-overhead"}
    assert compile_options({"backend": "eager"}) == {"backend": "eager"}
    for bad in ("fast", 3, {"fullgraph": False}):
        with pytest.raises(ValueError, match="compile"):
            compile_options(bad)
    with pytest.raises(ValueError, match="compile must be one of"):
        load_pipeline(compile="turbo")
    assert not uses_cudagraphs({"mode": "reduce-overhead"}, torch.device("cpu"))
    assert uses_cudagraphs({"mode": "reduce-overhead"}, torch.device("cuda"))
    assert uses_cudagraphs({"mode": "max-autotune"}, torch.device("cuda"))
    assert not uses_cudagraphs({}, torch.device("cuda"))
    assert uses_cudagraphs({"options": {"triton.cudagraphs": True}}, torch.device("cuda"))
    assert not uses_cudagraphs({"mode": "reduce-overhead", "backend": "aot_eager"}, torch.device("cuda"))
