"""Super-resolution stages trained on crops (data.crop_size): aligned crops of the image and
of its whole low-res version, config errors that name the key, exact resume, and a stage
trained on crops that samples at 4x its training size through the normal sampling path."""
import math
import random

import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from imagen_fast.data import (ImageTransform, StreamDataset, StreamPosition, make_loader,  # noqa: E402
                              to_tensor, transform_for_stage, write_shapes)
from imagen_fast.train import Trainer, check_stage, stage_model_config  # noqa: E402
from imagen_fast.train_config import ConfigError, config_from_dict  # noqa: E402
from support.training import losses  # noqa: E402


def _noise_image(w, h, seed):
    """Random pixels: every crop position gives a different crop, so a crop's place is unique."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(a.numpy(), "RGB")


def _find(whole, crop):
    """Every (x0, y0) where ``crop`` (3, c, c) sits in ``whole`` (3, S, S)."""
    c, s = crop.shape[-1], whole.shape[-1]
    return [(x, y) for y in range(s - c + 1) for x in range(s - c + 1)
            if torch.equal(whole[:, y:y + c, x:x + c], crop)]


@pytest.mark.parametrize("size,lowres,crop,src", [(32, 8, 16, (32, 32)), (24, 12, 10, (40, 30))])
def test_lowres_crop_is_the_crop_of_the_whole_lowres_image(size, lowres, crop, src):
    t = ImageTransform(size, crop="random", lowres_size=lowres, crop_size=crop)
    factor = size // lowres
    img = _noise_image(*src, seed=size)
    offsets = set()
    for seed in range(12):
        image, low = t(img, random.Random(seed))
        assert image.shape == (3, crop, crop) and low.shape == (3, crop // factor, crop // factor)
        # the whole image this crop came from: the same rng draws the same resize + crop first
        whole = t.crop_image(img, random.Random(seed))
        assert whole.size == (size, size)
        found = _find(to_tensor(whole), image)
        assert len(found) == 1
        x0, y0 = found[0]
        assert x0 % factor == 0 and y0 % factor == 0, "offsets on the low-res pixel grid"
        # the conditioning: the whole image downsampled as at sampling time, then cut there
        whole_low = to_tensor(whole.resize((lowres, lowres), Image.BICUBIC))
        lx, ly, lc = x0 // factor, y0 // factor, crop // factor
        assert torch.equal(low, whole_low[:, ly:ly + lc, lx:lx + lc])
        offsets.add((x0, y0))
        # seeded: the same rng seed gives the same pair
        again = t(img, random.Random(seed))
        assert torch.equal(again[0], image) and torch.equal(again[1], low)
    assert len(offsets) > 3, "crops move"


def test_crop_size_equal_to_the_image_or_zero_is_the_whole_pair():
    img = _noise_image(32, 32, seed=1)
    plain = ImageTransform(32, lowres_size=8)(img)
    for crop in (0, 32, None):
        got = ImageTransform(32, lowres_size=8, crop_size=crop)(img, random.Random(0))
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])


@pytest.mark.parametrize("kw,words", [
    (dict(crop_size=10), "multiple of the super-resolution factor 4"),
    (dict(crop_size=64), "<= the resolution (32)"),
    (dict(crop_size=-4), "int >= 0"),
    (dict(crop_size=8, lowres_size=None), "super-resolution"),
    (dict(crop_size=12, lowres_size=12), "multiple of the low-res resolution"),
])
def test_transform_rejects_crops_off_the_grid(kw, words):
    args = {"lowres_size": 8, **kw}
    with pytest.raises(ValueError, match="crop_size") as e:
        ImageTransform(32, **args)
    assert words in str(e.value)


def _sr_raw(out_dir, steps=4, crop=16, **data):
    """A tiny 16 -> 64 SR stage (factor 4) trained on 16 px crops (4 px low-res)."""
    return {
        "model": {"preset": "tiny-sr128", "overrides": {
            "image_size": 64, "lowres_size": 16, "channels": [8, 16], "num_res_blocks": [1, 1],
            "self_attention": [False, False], "cross_attention": [False, True], "num_heads": 2,
            "text_dim": 16, "context_dim": 16, "emb_dim": 32, "groups": 4, "pool_heads": 2}},
        "diffusion": {"noise_aug": True, "aug_level_max": 0.5},
        "data": {"kind": "shapes", "path": "shapes:48:5", "resolution": 64,
                 "lowres_resolution": 16, "crop_size": crop, **data},
        "text": {"encoder": "hash:16", "max_length": 8},
        "train": {"steps": steps, "batch_size": 4, "warmup_steps": 2, "lr": 1e-3, "seed": 7,
                  "ema_decay": 0.9},
        "log": {"out_dir": str(out_dir), "log_every": 1, "ckpt_every": 2, "keep": 3,
                "progress": False, "tensorboard": False},
    }


@pytest.mark.parametrize("data,words", [
    (dict(crop_size=18), "data.crop_size must be a multiple of the super-resolution factor 4"),
    (dict(crop_size=128), "data.crop_size must be <= the resolution (64)"),
    (dict(crop_size=-8), "data.crop_size must be an int >= 0"),
    (dict(crop_size=16, lowres_resolution=24), "data.crop_size needs the resolution (64) to be a multiple"),
    (dict(crop_size=16, lowres_resolution=0), "data.crop_size needs a low-res size"),
])
def test_config_rejects_bad_crops_naming_the_key(tmp_path, data, words):
    raw = _sr_raw(tmp_path)
    raw["data"].update(data)
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert words in str(e.value)


def test_stage_check_wants_crops_the_unet_can_halve_and_the_presets_lowres(tmp_path):
    raw = _sr_raw(tmp_path, crop=12)                     # on the factor's grid, but 12 % 2**3 != 0
    raw["model"]["overrides"].update(channels=[8, 16, 16], num_res_blocks=[1, 1, 1],
                                     self_attention=[False] * 3, cross_attention=[False, False, True])
    cfg = config_from_dict(raw)
    with pytest.raises(ValueError, match=r"data.crop_size=12 must be a multiple of 8: preset"):
        check_stage(cfg, stage_model_config(cfg))
    raw = _sr_raw(tmp_path)
    raw["data"]["lowres_resolution"] = 32                # the preset conditions on 16 px
    cfg = config_from_dict(raw)
    with pytest.raises(ValueError, match="data.lowres_resolution=32 differs from the preset's lowres_size=16"):
        check_stage(cfg, stage_model_config(cfg))


def test_crop_stream_replays_after_a_resume(tmp_path):
    write_shapes(tmp_path / "d", 24, seed=2, resolution=32, shard_size=6)

    def make():
        return StreamDataset(tmp_path / "d", transform_for_stage(32, 8, crop_size=16), seed=5, shuffle_buffer=4)

    def take(ds, n, pos=None):
        out = []
        for b in make_loader(ds, 3):
            out.append((b["key"], b["image"], b["lowres"]))
            if pos is not None:
                pos.update(b)
            if len(out) == n:
                return out

    full = take(make(), 12)                               # endless: crosses epochs
    assert full[0][1].shape == (3, 3, 16, 16) and full[0][2].shape == (3, 3, 4, 4)
    ds = make()
    pos = StreamPosition(ds)
    head = take(ds, 5, pos)
    ds2 = make()
    ds2.set_position(pos.state_dict())
    got = head + take(ds2, 7)
    assert [g[0] for g in got] == [f[0] for f in full]
    for g, f in zip(got, full):
        assert torch.equal(g[1], f[1]) and torch.equal(g[2], f[2])   # the same crops, both


def test_resumed_crop_training_repeats_the_uninterrupted_run(tmp_path):
    Trainer(config_from_dict(_sr_raw(tmp_path / "straight", steps=4))).run()
    Trainer(config_from_dict(_sr_raw(tmp_path / "split", steps=2))).run()
    Trainer(config_from_dict(_sr_raw(tmp_path / "split", steps=4)), resume=True).run()
    expected, resumed = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step


def test_stage_trained_on_crops_samples_at_four_times_its_training_size(tmp_path):
    from imagen_fast.export import stage_from_run
    from imagen_fast.cascade import ImagenCascade, default_stage

    run = tmp_path / "sr"
    raw = _sr_raw(run, steps=3)
    raw["log"].update(sample_every=3, sample_steps=2, sample_guidance=1.0,
                      sample_prompts=["a red circle", "two blue squares"])
    trainer = Trainer(config_from_dict(raw))
    assert trainer.micro_batch == 4
    summary = trainer.run()
    assert summary["step"] == 3 and math.isfinite(summary["loss"])
    # it trained on 16 px crops (4 px low-res) ...
    assert tuple(trainer.last_lowres.shape) == (4, 3, 4, 4)
    # ... its training-time grid is drawn on whole images, at the full 64 px
    grid = Image.open(run / "samples" / "step_00000003.png")
    assert grid.size == (2 * 64, 64)

    # the stage as the export path rebuilds it: both resolutions recorded
    stage, text, step = stage_from_run(run)
    config = stage.unet.config
    assert (config["image_size"], config["lowres_size"], config["train_size"]) == (64, 16, 16)
    assert stage.resolution == 64 and step == 3

    # sampled through the cascade after a 16 px base stage: 64 px = 4x the training crop
    torch.manual_seed(0)
    base = default_stage("base", "tiny-base32", image_size=16, text_dim=16, context_dim=16)
    for st in (base, stage):
        st.sampling = st.sampling.replace(steps=2, guidance=1.0)
    cascade = ImagenCascade([base, stage], text=text)
    emb = torch.randn(2, 8, 16)
    out = cascade.sample(emb, torch.ones(2, 8, dtype=torch.bool), return_all=True,
                         generator=torch.Generator().manual_seed(0))
    assert out[0].shape == (2, 3, 16, 16) and out[1].shape == (2, 3, 64, 64)
    assert torch.isfinite(out[1]).all() and out[1].abs().max() <= 1


def test_jax_trainer_trains_on_crops(tmp_path):
    pytest.importorskip("jax")
    from imagen_fast.jax.train import JaxTrainer
    raw = _sr_raw(tmp_path / "jax", steps=1)
    raw["log"].update(sample_every=1, sample_steps=1, sample_guidance=1.0, sample_prompts=["a red circle"])
    trainer = JaxTrainer(config_from_dict(raw))
    summary = trainer.run()
    assert summary["step"] == 1 and math.isfinite(summary["loss"])
    assert trainer.model.config["train_size"] == 16
    assert tuple(trainer.last_lowres.shape) == (4, 3, 4, 4)
    assert Image.open(tmp_path / "jax" / "samples" / "step_00000001.png").size == (64, 64)


def test_export_extends_a_cascade_with_a_crop_trained_stage(tmp_path):
    """`imagen-fast export --extend CASCADE --run RUN`: the saved cascade's stages first,
    the run's after; the result samples through load_pipeline at the full resolution."""
    from imagen_fast.cascade import ImagenCascade, default_stage
    from imagen_fast.cli import main
    from imagen_fast.pipeline import load_pipeline

    run = tmp_path / "sr"
    Trainer(config_from_dict(_sr_raw(run, steps=2))).run()
    torch.manual_seed(0)
    base = default_stage("base16", "tiny-base32", image_size=16, text_dim=16, context_dim=16)
    base.sampling = base.sampling.replace(steps=2, guidance=3.0)
    ImagenCascade([base], text={"encoder": "hash:16", "max_length": 8}).save(str(tmp_path / "one"))
    out = tmp_path / "two"
    assert main(["export", "--extend", str(tmp_path / "one"), "--run", str(run), "--name", "sr64",
                 "--sampling", '[{"steps": 2, "aug_level": 0.1}]', "--out", str(out)]) == 0
    cascade = ImagenCascade.load(str(out))
    assert [st.name for st in cascade.stages] == ["base16", "sr64"]
    assert cascade.stages[0].sampling.guidance == 3.0                 # kept as saved
    assert (cascade.stages[1].sampling.steps, cascade.stages[1].sampling.aug_level) == (2, 0.1)
    assert cascade.stages[1].unet.config["train_size"] == 16
    images = load_pipeline(str(out))(["a red circle"], num_images_per_prompt=2, seed=1)
    assert [im.size for im in images] == [(64, 64)] * 2
    # another text encoder than the extended cascade's is refused
    ImagenCascade([base], text={"encoder": "hash:32", "max_length": 8}).save(str(tmp_path / "other"))
    assert main(["export", "--extend", str(tmp_path / "other"), "--run", str(run),
                 "--out", str(tmp_path / "bad")]) == 2
