"""CLIP score with a tiny random CLIP saved to disk (its own character-level tokenizer):
the score against CLIPModel's own forward, the clamp at 0, manifests, bad input."""
import numpy as np
import pytest
import torch
from support.eval_helpers import random_image, tiny_clip_dir

from imagen_fast.eval.clip_score import CLIPScorer, score_manifest
from imagen_fast.eval.manifest import read_manifest, write_manifest


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip_dir(tmp_path_factory.mktemp("clip"))


def test_clip_score_matches_the_models_own_logits(clip_dir):
    scorer = CLIPScorer(clip_dir, batch_size=3)
    rng = np.random.default_rng(0)
    images = [random_image(rng, int(rng.integers(20, 60)), int(rng.integers(20, 60))) for _ in range(7)]
    captions = [f"a photo of thing {i}" + " very" * i for i in range(7)]
    scores = scorer.score(images, captions)
    assert scores.shape == (7,)
    # independent path: CLIPModel.forward's logits_per_image are logit_scale * cosine
    inputs = scorer.processor(text=captions, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inputs)
        cos = torch.diagonal(out.logits_per_image) / scorer.model.logit_scale.exp()
    np.testing.assert_allclose(scores, 100 * cos.clamp(min=0).double().numpy(), rtol=1e-4, atol=1e-4)
    assert scorer.mean_score(images, captions) == pytest.approx(scores.mean())


def test_clip_score_clamps_negative_cosines_to_zero(clip_dir):
    scorer = CLIPScorer(clip_dir, batch_size=16)
    rng = np.random.default_rng(1)
    images = [random_image(rng, 32, 32) for _ in range(24)]
    captions = [" ".join(rng.choice(list("abcdefghij"), size=5)) for _ in range(24)]
    inputs = scorer.processor(text=captions, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inputs)
        cos = (torch.diagonal(out.logits_per_image) / scorer.model.logit_scale.exp()).numpy()
    scores = scorer.score(images, captions)
    assert (cos < 0).any() and (cos > 0).any()    # a random model gives both signs
    assert np.all(scores[cos < 0] == 0) and np.all(scores[cos > 0] > 0)


def test_score_manifest_per_system_and_category(clip_dir, tmp_path):
    rng = np.random.default_rng(2)
    items = []
    for i in range(4):
        imgs = {}
        for s in ("A", "B"):
            name = f"{s}{i}.png"
            random_image(rng, 32, 32).save(tmp_path / name)
            imgs[s] = [name]
        items.append({"id": str(i), "caption": f"caption {i}", "category": "even" if i % 2 == 0
                      else "odd", "images": imgs})
    write_manifest(str(tmp_path), [{"label": "A"}, {"label": "B"}], items)
    m = read_manifest(str(tmp_path))
    scorer = CLIPScorer(clip_dir)
    r = score_manifest(scorer, m)
    assert set(r) == {"A", "B"} and r["A"]["num"] == 4
    from imagen_fast.eval.images import load_rgb
    direct = scorer.score([load_rgb(str(tmp_path / f"A{i}.png")) for i in range(4)],
                          [f"caption {i}" for i in range(4)])
    assert r["A"]["clip_score"] == pytest.approx(direct.mean())
    assert r["A"]["categories"]["even"] == pytest.approx(direct[[0, 2]].mean())
    with pytest.raises(ValueError, match="'C' is not in"):
        score_manifest(scorer, m, ["C"])


def test_clip_bad_input(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP model directory not found"):
        CLIPScorer(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CLIPScorer(str(tmp_path / "empty"))
    scorer = CLIPScorer(clip_dir)
    with pytest.raises(ValueError, match="differ in length"):
        scorer.score([random_image(np.random.default_rng(0), 8, 8)], ["a", "b"])
