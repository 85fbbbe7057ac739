"""imagen_fast/bench/bench_compile.py runs (its logic, not speeds): a --quick run in a fresh
process writes its tables with one graph per compiled function, no recompiles and the
eager outputs; the fresh-process measures (compile times, the e2e call) under slow."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench(tmp_path, *extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "imagen_fast.bench.bench_compile", "--quick", "--backend", "eager",
                        "--results-dir", str(tmp_path), "--out", "quick", *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # a busy machine (the harness's Watch) puts the run under drafts/: either is a run
    out = tmp_path if (tmp_path / "quick.json").is_file() else tmp_path / "drafts"
    assert (out / "quick.md").is_file()
    return json.loads((out / "quick.json").read_text())["raw"]


def _check_compiled(row):
    assert row["graphs"] == 1 and row["recompiles"] == 0, row
    assert row["max_abs_diff"] <= 1e-5, row


def test_quick_run_compiles_once_and_matches_eager(tmp_path):
    raw = _bench(tmp_path)
    assert not raw["skipped"], raw["skipped"]
    got = {(r["what"], r["mode"]): r for r in raw["rows"]}
    assert set(got) == {("sample run", "none"), ("sample run", "default"),
                        ("train step", "none"), ("train step", "default")}
    for (what, mode), row in got.items():
        assert row["median_ms"] > 0 and row["images_per_s"] > 0 and row["first_s"] > 0
        if mode != "none":
            _check_compiled(row)
    assert got[("sample run", "default")]["steps"] == 2


@pytest.mark.slow
def test_fresh_process_compile_times_and_the_e2e_call(tmp_path):
    from imagen_fast import ImagenCascade
    torch.manual_seed(0)
    cascade = ImagenCascade.from_presets(("tiny-base32", "tiny-sr64"))
    cascade.text = {"encoder": "hash:32"}
    cascade.save(str(tmp_path / "cascade"))
    raw = _bench(tmp_path, "--repeats", "1", "--no-train", "--e2e-checkpoint", str(tmp_path / "cascade"))
    assert not raw["skipped"], raw["skipped"]
    sample = next(r for r in raw["rows"] if r["mode"] == "default")
    assert sample["fresh_recompiles"] == 0 and sample["first_cold_s"] > 0 and sample["first_warm_s"] > 0
    calls = {r["mode"]: r for r in raw["e2e"]}
    assert set(calls) == {"eager", "default cold", "default warm"}
    for name in ("default cold", "default warm"):
        assert calls[name]["graphs"] == 2 and calls[name]["recompiles"] == 0    # one per stage
        assert calls[name]["max_abs_diff"] <= 1e-5
