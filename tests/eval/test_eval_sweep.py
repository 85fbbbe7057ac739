"""Guidance sweep: the weight goes to the chosen stage, each point gets FID and CLIP
score on the same captions and seeds, the trade-off curve is a real PNG."""
import json

import numpy as np
import pytest
from support.eval_helpers import FakeGenerator, small_extractor, tiny_clip_dir, write_coco
from PIL import Image

from imagen_fast.eval.clip_score import CLIPScorer
from imagen_fast.eval.coco import load_coco
from imagen_fast.eval.generator import System
from imagen_fast.eval.sweep import (
    guidance_setting,
    num_stages,
    plot_tradeoff,
    run_sweep,
)


def test_guidance_goes_to_one_stage():
    gen = FakeGenerator(stages=3)
    assert num_stages(gen) == 3
    s = System("m", gen, {"guidance": [None, 8.0, 4.0]})
    assert guidance_setting(s, 2.5, 0) == [2.5, 8.0, 4.0]
    assert guidance_setting(System("m", gen, {"guidance": 5.0}), 2.5, 1) == [5.0, 2.5, 5.0]
    assert guidance_setting(s, 2.5, None) == 2.5
    with pytest.raises(ValueError, match="not a stage"):
        guidance_setting(s, 1.0, 3)
    with pytest.raises(ValueError, match="does not say how many stages"):
        guidance_setting(System("f", lambda p, seed=0, **k: []), 1.0, 0)


def test_sweep_end_to_end(tmp_path):
    coco = load_coco(write_coco(tmp_path / "coco", num_images=6, captions_per_image=2))
    gen = FakeGenerator(size=32)
    clip = CLIPScorer(tiny_clip_dir(tmp_path / "clip"))
    r = run_sweep(System("fake", gen), [1.0, 2.0, 4.0], coco, small_extractor(), clip,
                  out_dir=str(tmp_path / "sweep"), num=5, size=32, batch_size=5,
                  cache_dir=str(tmp_path / "cache"))
    assert [p["guidance"] for p in r["points"]] == [1.0, 2.0, 4.0]
    # every point: the same 5 captions, the same seed, the weight on stage 0 only
    prompt_sets = {tuple(c[0]) for c in gen.calls}
    assert len(prompt_sets) == 1 and {c[1] for c in gen.calls} == {0}
    assert [c[2]["guidance"] for c in gen.calls] == [[1.0, None], [2.0, None], [4.0, None]]
    fids = [p["fid"] for p in r["points"]]
    assert len(set(fids)) == 3 and all(np.isfinite(fids))
    assert all(0 <= p["clip_score"] <= 100 for p in r["points"])
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["points"] == json.loads(json.dumps(r["points"]))
    with Image.open(tmp_path / "sweep" / "sweep.png") as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
        # not a blank canvas: the curve and labels are drawn
        assert len(np.unique(np.asarray(im.convert("L")))) > 20


def test_plot_tradeoff_orders_points_by_weight(tmp_path):
    pts = [{"guidance": 3.0, "fid": 20.0, "clip_score": 30.0},
           {"guidance": 1.0, "fid": 25.0, "clip_score": 26.0}]
    path = plot_tradeoff(pts, str(tmp_path / "p.png"), title="t")
    with Image.open(path) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="at least one guidance"):
        run_sweep(System("x", FakeGenerator()), [], None, None, None, out_dir=str(tmp_path))
