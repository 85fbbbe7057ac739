"""The shapes checker scores the dataset's own renders near 100% and catches wrong
captions; `imagen-fast eval shapes` runs end to end."""
import json
import random

import pytest
import torch

pytest.importorskip("PIL")

from support.eval_helpers import tiny_cascade_dir  # noqa: E402

from imagen_fast.cli import main  # noqa: E402
from imagen_fast.data.shapes import COLOURS, SHAPES, combination, make_scene, parse_caption, render  # noqa: E402
from imagen_fast.eval.shapes import heldout_prompts, run_eval  # noqa: E402
from imagen_fast.eval.shapes_checker import ATTRIBUTES, check_image  # noqa: E402


def _renders(n, res=64, seed=11):
    for i in range(n):
        scene = make_scene(seed, i, "heldout")
        img, _ = render(scene, res)
        yield img, parse_caption(combination(scene))


@pytest.mark.parametrize("res", [64, 128])
def test_checker_scores_ground_truth_near_100(res):
    n = 300 if res == 64 else 60
    hits = {a: 0 for a in ATTRIBUTES}
    for img, scene in _renders(n, res):
        v = check_image(img, scene).as_dict()
        for a in ATTRIBUTES:
            hits[a] += v[a]
    acc = {a: h / n for a, h in hits.items()}
    assert all(v >= 0.97 for v in acc.values()), acc


def _wrong(scene, attribute, rng):
    s = json.loads(json.dumps(scene))
    g = s["objects"][0]
    if attribute == "colour":
        used = {o["colour"] for o in s["objects"]}
        g["colour"] = rng.choice([c for c in COLOURS if c not in used])
    elif attribute == "count":
        g["count"] = rng.choice([c for c in (1, 2, 3, 4) if c != g["count"]])
    elif attribute == "shape":
        g["shape"] = rng.choice([x for x in SHAPES if x != g["shape"]])
    else:
        flip = {"left": "right", "right": "left", "above": "below", "below": "above"}
        if s.get("relation"):
            s["relation"] = flip[s["relation"]]
        else:
            s["position"] = flip[s["position"]]
    return s


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_checker_rejects_a_wrong_caption(attribute):
    rng = random.Random(attribute)
    rejected = n = 0
    for img, scene in _renders(80, seed=5):
        if attribute == "shape" and len(scene["objects"]) == 2 and \
                scene["objects"][0]["colour"] == scene["objects"][1]["colour"]:
            continue
        if attribute == "position" and scene.get("position") == "center":
            continue                     # a centre group may truly sit left of centre too
        n += 1
        rejected += not getattr(check_image(img, _wrong(scene, attribute, rng)), attribute)
    assert rejected / n >= 0.95, (attribute, rejected, n)


def test_checker_fails_blank_and_noise_images():
    from PIL import Image
    blank = Image.new("RGB", (64, 64), (248, 248, 248))
    noise = Image.fromarray((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy())
    scene = parse_caption("two red circles above a blue square")
    for img in (blank, noise):
        v = check_image(img, scene)
        assert not (v.colour or v.count or v.shape or v.position)
    with pytest.raises(ValueError, match="img"):
        check_image(torch.zeros(64, 64).numpy(), scene)


def test_heldout_prompts_are_split_and_seeded():
    from imagen_fast.data.shapes import is_held_out
    p = heldout_prompts(10, seed=1)
    assert len(p) == 10 and p == heldout_prompts(10, seed=1) and p != heldout_prompts(10, seed=2)
    assert all(is_held_out(x) for x in p)
    assert sum(" of " in x or " above " in x or " below " in x for x in p) == 5


@pytest.fixture(scope="module")
def cascade_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cascade")
    tiny_cascade_dir(d)
    return d


def test_run_eval_reports_every_setting(cascade_dir):
    from imagen_fast import load_pipeline
    pipe = load_pipeline(cascade_dir)
    report, images = run_eval(pipe, num_prompts=2, images_per_prompt=1, high_guidance=6,
                              overrides={"steps": 1})
    assert list(report["results"]) == ["default", "no guidance", "static w=6", "dynamic w=6"]
    for res in report["results"].values():
        acc = res["summary"]["all prompts"]
        assert acc["images"] == 2 and all(0 <= acc[a] <= 1 for a in (*ATTRIBUTES, "overall", "all"))
        assert res["settings"]["steps"] == 1
    assert report["results"]["static w=6"]["settings"]["threshold"] == ["static", None]
    assert len(images["default"]) == 2


def test_cli_eval_shapes(cascade_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "shapes", "--checkpoint", str(cascade_dir), "--num-prompts", "2",
                 "--images-per-prompt", "1", "--steps", "1", "--out", str(out), "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "samples.png"}
    assert "| dynamic w=7 | all prompts |" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["eval", "shapes", "--checkpoint", str(cascade_dir), "--high-guidance", "3"]) == 2
    assert "--high-guidance" in capsys.readouterr().err
    assert main(["eval", "shapes", "--checkpoint", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "not a cascade checkpoint" in capsys.readouterr().err
