"""`imagen-fast eval ...` end to end on the tiny random cascade, and the one-line errors
(exit 2) for missing weights, a COCO folder without captions, an empty prompt set."""
import json
import os
import shutil

import pytest
from support.eval_helpers import (
    random_inception_file,
    tiny_cascade_dir,
    tiny_clip_dir,
    write_coco,
)

from imagen_fast.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    return {"ckpt": tiny_cascade_dir(root / "ckpt"),
            "weights": random_inception_file(root / "pt_inception-2015-12-05.pth"),
            "clip": tiny_clip_dir(root / "clip"),
            "coco": write_coco(root / "coco", num_images=5, captions_per_image=2),
            "root": root}


def run(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("imagen-fast: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_input_is_one_line_and_exit_2(assets, capsys, tmp_path):
    a = assets
    code, _, err = run(capsys, "fid", "--weights", tmp_path / "missing.pth", "--coco", a["coco"],
                       "--model", a["ckpt"])
    one_line_error(code, err, "weights file not found", "missing.pth")
    (tmp_path / "nocaps" / "val2014").mkdir(parents=True)
    code, _, err = run(capsys, "fid", "--weights", a["weights"], "--coco", tmp_path / "nocaps",
                       "--model", a["ckpt"])
    one_line_error(code, err, "no captions file", "nocaps")
    empty = tmp_path / "empty.csv"
    empty.write_text("Prompt,Category\n")
    code, _, err = run(capsys, "drawbench", "--model", a["ckpt"], "--prompts", empty, "--out",
                       tmp_path / "o")
    one_line_error(code, err, "no prompts", "empty.csv")
    code, _, err = run(capsys, "drawbench", "--model", a["ckpt"], "--categories", "Nope",
                       "--out", tmp_path / "o")
    one_line_error(code, err, "Nope")
    code, _, err = run(capsys, "drawbench", "--model", tmp_path / "nockpt", "--out", tmp_path / "o")
    one_line_error(code, err, "cascade checkpoint file not found", "config.json")
    code, _, err = run(capsys, "drawbench", "--model", f"{a['ckpt']} loudness=3", "--out",
                       tmp_path / "o")
    one_line_error(code, err, "unknown setting 'loudness'")
    code, _, err = run(capsys, "clip", "--clip", tmp_path / "noclip", "--samples", tmp_path)
    one_line_error(code, err, "no manifest.json")
    code, _, err = run(capsys, "serve", "--db", tmp_path / "none.sqlite", "--report")
    one_line_error(code, err, "rating database not found")
    code, _, err = run(capsys, "sweep", "--model", a["ckpt"], "--weights", a["weights"], "--clip",
                       tmp_path / "noclip", "--coco", a["coco"], "--guidance", "1,2",
                       "--out", tmp_path / "s")
    one_line_error(code, err, "CLIP model directory not found")


def test_drawbench_clip_and_serve_report(assets, capsys, tmp_path):
    a = assets
    prompts = tmp_path / "p.csv"
    prompts.write_text("Prompt,Category\nA red cube.,Colors\nTwo cats.,Counting\n")
    out = tmp_path / "db"
    code, stdout, err = run(capsys, "drawbench", "--model", f"{a['ckpt']} label=default",
                            "--model", f"{a['ckpt']} guidance=[3,5] label=strong", "--prompts",
                            prompts, "--num-images", 1, "--batch-size", 2, "--out", out, "--quiet")
    assert code == 0, err
    assert "open" in stdout and os.path.isfile(out / "index.html")
    assert os.path.isfile(out / "category-counting.html")
    code, stdout, err = run(capsys, "clip", "--clip", a["clip"], "--samples", out, "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert set(r["systems"]) == {"default", "strong"} and r["systems"]["strong"]["num"] == 2
    assert set(r["systems"]["default"]["categories"]) == {"Colors", "Counting"}
    code, stdout, err = run(capsys, "serve", "--db", tmp_path / "r.sqlite", "--samples", out,
                            "--report")
    assert code == 0, err
    assert "0 started" in stdout and "no answers from kept raters yet" in stdout


def test_fid_and_sweep_commands(assets, capsys, tmp_path):
    a = assets
    common = ["--weights", a["weights"], "--feature-input-size", 80, "--cache-dir",
              tmp_path / "cache", "--coco", a["coco"], "--model", f"{a['ckpt']} label=tiny",
              "--size", 48, "--quiet"]
    code, stdout, err = run(capsys, "fid", *common, "--num", 3, "--batch-size", 3, "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["num"] == 3 and r["size"] == 48 and r["fid"] > 0 and r["reference"]["num_images"] == 5
    code, stdout, err = run(capsys, "sweep", *common, "--clip", a["clip"], "--guidance", "1,4",
                            "--num", 2, "--batch-size", 2, "--out", tmp_path / "sweep")
    assert code == 0, err
    assert "w=1: FID" in stdout and "w=4: FID" in stdout
    assert os.path.isfile(tmp_path / "sweep" / "sweep.png")
    # the reference statistics were computed once and reused by the sweep
    assert len(os.listdir(tmp_path / "cache")) == 1
    # FID of one folder against another
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        for f in sorted(os.listdir(os.path.join(a["coco"], "val2014")))[:3 if name == "x" else 2]:
            shutil.copy(os.path.join(a["coco"], "val2014", f), tmp_path / name / f)
    code, stdout, err = run(capsys, "fid", "--weights", a["weights"], "--feature-input-size", 80,
                            "--images", tmp_path / "x", "--ref", tmp_path / "y", "--cache-dir", "")
    assert code == 0, err
    assert stdout.startswith("FID ") and "3 vs 2 images" in stdout
