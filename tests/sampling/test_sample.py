"""`load_pipeline` / `imagen-fast sample`: images from prompts, per-stage settings, output
files, and a one-line error for every mistake a user can make."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("safetensors")

from support.eval_helpers import TEXT, tiny_cascade_dir  # noqa: E402

from imagen_fast import load_pipeline  # noqa: E402
from imagen_fast.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def cascade_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cascade")
    tiny_cascade_dir(d, steps=4, dtype=torch.float16)
    return d


FAST = ["--steps", "2", "--quiet"]


def test_pipeline_images_seeds_and_stage_settings(cascade_dir):
    pipe = load_pipeline(cascade_dir)
    assert pipe.stage_names == ["base", "sr64"]
    ims = pipe(["two red circles", "a blue square on the left"], num_images_per_prompt=2, steps=2)
    assert len(ims) == 4 and all(im.size == (64, 64) for im in ims)
    a = pipe("a red circle", steps=[2, 1], seed=3, return_tensors=True)
    b = pipe("a red circle", steps=[2, 1], seed=3, return_tensors=True)
    c = pipe("a red circle", steps=[2, 1], seed=4, return_tensors=True)
    assert a.shape == (1, 3, 64, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1.0
    base_only = pipe("a red circle", steps=2, num_stages=1, return_tensors=True)
    assert base_only.shape == (1, 3, 32, 32)
    cfg = pipe.settings(guidance=[5.0, None], sampler="ddim", aug_level=0.2)
    assert [c.guidance for c in cfg] == [5.0, pipe.cascade.stages[1].sampling.guidance]
    assert {c.sampler for c in cfg} == {"ddim"} and {c.aug_level for c in cfg} == {0.2}
    for bad, match in [(dict(guidance=[1.0, 2.0, 3.0]), "one per stage"), (dict(guidance=-1.0), "guidance"),
                       (dict(percentile=0.0), "percentile"), (dict(steps=0), "steps"),
                       (dict(sampler="euler"), "sampler")]:
        with pytest.raises(ValueError, match=match):
            pipe.settings(**bad)
    with pytest.raises(ValueError, match="empty"):
        pipe(["a red circle", "  "], steps=1)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        pipe("a red circle", num_images_per_prompt=0)


def test_saved_weights_are_fp16_and_load_back(cascade_dir):
    from safetensors import safe_open
    with safe_open(str(cascade_dir / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    pipe = load_pipeline(cascade_dir)
    assert next(pipe.cascade.parameters()).dtype == torch.float32       # CPU default: fp32 compute
    assert pipe.cascade.text == TEXT


def test_cli_writes_files_and_grid(cascade_dir, tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "img.png"
    assert main(["sample", "two red circles", "--checkpoint", str(cascade_dir), "-o", str(out),
                 "--num-images", "3", *FAST]) == 0
    assert capsys.readouterr().out.split() == [str(out)]         # one file: the grid of the three
    assert Image.open(out).size == (3 * 64, 64)
    grid = tmp_path / "grid.png"
    assert main(["sample", "two red circles", "a green triangle", "--checkpoint", str(cascade_dir),
                 "-o", str(grid), "--num-images", "2", "--each", "--guidance", "3,2",
                 "--sampler", "dpmpp", "--threshold", "static", *FAST]) == 0
    each = [tmp_path / f"grid-p{p}-i{i}.png" for p in range(2) for i in range(2)]
    assert capsys.readouterr().out.split() == [str(grid)] + [str(f) for f in each]
    assert Image.open(grid).size == (2 * 64, 2 * 64)                 # a row per prompt
    whole = Image.open(grid)
    for k, f in enumerate(each):                                     # the grid holds each image
        box = ((k % 2) * 64, (k // 2) * 64, (k % 2 + 1) * 64, (k // 2 + 1) * 64)
        assert list(whole.crop(box).getdata()) == list(Image.open(f).getdata())
    one = tmp_path / "one.jpg"
    assert main(["sample", "a red circle", "--checkpoint", str(cascade_dir), "-o", str(one),
                 "--num-images", "1", "--percentile", "0.9", "--aug-level", "0.1", *FAST]) == 0
    assert Image.open(one).size == (64, 64)
    base = tmp_path / "base.png"                                     # stop after the base stage
    assert main(["sample", "a red circle", "--checkpoint", str(cascade_dir), "-o", str(base),
                 "--num-images", "2", "--stages", "1", *FAST]) == 0
    assert Image.open(base).size == (2 * 32, 32)


def test_cli_prompts_files(cascade_dir, tmp_path, capsys):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n  two blue squares  \n")
    csvf = tmp_path / "bench.csv"
    csvf.write_text('Prompt,Category\n"a red circle, on a gray background",Colors\nthree green triangles,Counting\n')
    for f in (txt, csvf):
        out = tmp_path / f"{f.stem}.png"
        assert main(["sample", "--prompts-file", str(f), "--checkpoint", str(cascade_dir),
                     "-o", str(out), "--num-images", "1", *FAST]) == 0
        from PIL import Image
        assert Image.open(out).size == (64, 2 * 64)                   # two prompts, a row each


def _bad_cases(tmp_path, cascade_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("Text,Category\nhello,x\n")
    notcascade = tmp_path / "notcascade"
    notcascade.mkdir()
    (notcascade / "config.json").write_text('{"format": "something-else"}')
    (notcascade / "model.safetensors").write_bytes(b"")
    afile = tmp_path / "afile"
    afile.write_text("x")
    ck = ["--checkpoint", str(cascade_dir)]
    out = ["-o", str(tmp_path / "o.png")]
    return [
        (["sample", "", *ck, *out], "empty prompt"),
        (["sample", *ck, *out], "give a prompt"),
        (["sample", "--prompts-file", str(empty), *ck, *out], "holds no prompts"),
        (["sample", "--prompts-file", str(tmp_path / "missing.txt"), *ck, *out], "no such file"),
        (["sample", "--prompts-file", str(nocol), *ck, *out], "Prompt"),
        (["sample", "x", "--sampler", "euler", *ck, *out], "--sampler"),
        (["sample", "x", "--guidance", "-1", *ck, *out], "--guidance"),
        (["sample", "x", "--guidance", "abc", *ck, *out], "--guidance"),
        (["sample", "x", "--guidance", "1,2,3", *ck, *out], "one per stage"),
        (["sample", "x", "--percentile", "0", *ck, *out], "--percentile"),
        (["sample", "x", "--percentile", "99.5", *ck, *out], "--percentile"),
        (["sample", "x", "--steps", "0", *ck, *out], "--steps"),
        (["sample", "x", "--stages", "0", *ck, *out], "--stages"),
        (["sample", "x", "--stages", "3", *ck, *out], "--stages: the cascade has 2 stage(s)"),
        (["sample", "x", "--num-images", "0", *ck, *out], "--num-images"),
        (["sample", "x", "--threshold", "soft", *ck, *out], "--threshold"),
        (["sample", "x", "--start", "0", *ck, *out], "--start: must be a time in (0, 1]"),
        (["sample", "x", "--start", "0.5", *ck, *out], "start: stage 'base' is a base stage"),
        (["sample", "x", "--checkpoint", str(notcascade), *out], "not an imagen-fast-cascade"),
        (["sample", "x", "--checkpoint", str(tmp_path / "nowhere"), *out], "not a cascade checkpoint"),
        (["sample", "x", "--checkpoint", str(tmp_path), *out], "not a cascade checkpoint"),
        (["sample", "x", *ck, "-o", str(tmp_path / "no" / "dir.png")], "does not exist"),
        (["sample", "x", *ck, "-o", str(afile / "x.png")], "does not exist"),
        (["sample", "x", *ck, "-o", str(tmp_path / "noext")], "suffix"),
        (["sample", "x", *ck, *out, "--device", "cuda:7" if not torch.cuda.is_available() else "tpu"], "device"),
        (["sample", "x", *ck, *out, "--dtype", "int8"], "dtype"),
        (["sample", "x", *ck, *out, "--seed", "abc"], "--seed"),
        (["sample", "x", *ck, *out, "--compile", "fast"], "--compile"),
    ]


def test_cli_bad_input_one_line_exit_2(cascade_dir, tmp_path, capsys):
    for argv, needle in _bad_cases(tmp_path, cascade_dir):
        parse_error = "--seed" in argv or "--compile" in argv         # argparse's own errors
        with pytest.raises(SystemExit) if parse_error else _no_raise() as ctx:
            code = main(argv)
        if ctx is not None and hasattr(ctx, "value"):
            code = ctx.value.code
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)
        assert not (tmp_path / "o.png").exists()


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_cli_entry_point_prints_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "imagen_fast.cli", "sample", "x", "--steps", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["imagen-fast: error: --steps: must be a positive integer, got '0'"]


def test_shipped_cascade_is_complete_and_small():
    """The cascade in the package: base 32px -> SR 64px -> SR 256px on MiniLM, fp16,
    < 40 MB, with its training configs, logs and evaluations beside it."""
    from imagen_fast.pipeline import SHIPPED_CASCADE
    files = {p.relative_to(SHIPPED_CASCADE).as_posix() for p in SHIPPED_CASCADE.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "README.md", "training/base32.toml", "training/sr64.toml",
            "training/sampling.json", "training/retrain.sh", "training/base32-metrics.jsonl",
            "training/sr64-metrics.jsonl", "training/sr256.toml", "training/sr256-tail.toml",
            "training/sr256-metrics.jsonl", "training/sr256-ft.toml", "training/sr256-ft-metrics.jsonl",
            "eval/report.md", "eval/sr-report.md", "eval/timing.md"} <= files
    # the recipe at least parses (it takes hours to run)
    assert subprocess.run(["bash", "-n", str(SHIPPED_CASCADE / "training" / "retrain.sh")]).returncode == 0
    assert sum(p.stat().st_size for p in SHIPPED_CASCADE.rglob("*") if p.is_file()) < 40 * 2**20
    pipe = load_pipeline()
    assert [st.resolution for st in pipe.cascade.stages] == [32, 64, 256]
    # the last stage trained on 64 px crops, samples whole 256 px images from a truncated start
    last = pipe.cascade.stages[-1]
    assert last.unet.config["train_size"] == 64 and last.lowres_resolution == 64
    assert last.sampling.start < 1 and all(st.sampling.start == 1 for st in pipe.cascade.stages[:2])
    assert pipe.cascade.text["encoder"] == "minilm"
    import json

    from imagen_fast.core import normalize_names
    # written with the old spelling guidance_scale, read as guidance
    shipped = [normalize_names(s) for s in json.loads((SHIPPED_CASCADE / "training" / "sampling.json").read_text())]
    assert [{k: getattr(st.sampling, k) for k in s} for st, s in zip(pipe.cascade.stages, shipped)] == shipped
    assert [st.sampling.guidance for st in pipe.cascade.stages] == [7.0, 1.0, 1.0]


def test_shipped_cascade_cli_end_to_end(tmp_path, capsys):
    """`imagen-fast sample "<prompt>"` with nothing else but a few steps: real 256x256
    images; `--stages 2` stops at the 64 px stage."""
    out = tmp_path / "out.png"
    assert main(["sample", "two red circles above a blue square", "-o", str(out), "--num-images", "2",
                 "--steps", "3", "--seed", "1", "--quiet", "--each"]) == 0
    from PIL import Image
    import numpy as np
    assert Image.open(out).size == (2 * 256, 256)
    ims = [np.asarray(Image.open(tmp_path / f"out-p0-i{i}.png")) for i in range(2)]
    assert all(im.shape == (256, 256, 3) for im in ims)
    assert all(im.std() > 1.0 for im in ims) and not np.array_equal(ims[0], ims[1])
    two = tmp_path / "two.png"
    assert main(["sample", "two red circles above a blue square", "-o", str(two), "--num-images", "2",
                 "--steps", "3", "--seed", "1", "--quiet", "--stages", "2"]) == 0
    assert Image.open(two).size == (2 * 64, 64)
    # the 256 px images are the 64 px ones super-resolved: downsampled, they are close
    small = np.asarray(Image.open(two).crop((0, 0, 64, 64)), dtype=np.float64)
    down = np.asarray(Image.fromarray(ims[0]).resize((64, 64), Image.BICUBIC), dtype=np.float64)
    assert np.abs(small - down).mean() < 12


def test_cli_start_per_stage(cascade_dir, tmp_path):
    """--start 1,0.5: the SR stage starts from its upsampled input diffused to t = 0.5."""
    out = tmp_path / "s.png"
    assert main(["sample", "a red circle", "--checkpoint", str(cascade_dir), "-o", str(out),
                 "--num-images", "1", "--start", "1,0.5", *FAST]) == 0
    from PIL import Image
    assert Image.open(out).size == (64, 64)
