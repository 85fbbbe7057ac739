"""benchmarks/gpu_session.sh, the whole agenda of a lent GPU, dry-run on the CPU: every
part runs or is skipped with its reason (no failure, no timeout) and the summary and
archives come out, so a lent GPU is never lost to an error in the script."""
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["info", "build", "tests", "kernels", "ops", "model", "sanitizer"]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_session_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PY=sys.executable,
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("TRITON_INTERPRET", None)
    env["CUDA_VISIBLE_DEVICES"] = ""          # a dry run, even on a GPU machine
    r = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary
    status = dict(re.findall(r"^\| (\w+) \| ([^|]+) \|", summary, re.M))
    assert [p for p in PARTS if p not in status] == [], summary
    for p in PARTS:
        assert status[p].startswith("ok") or re.match(r"skipped \(.+\)", status[p]), (p, summary)
    for p in ("kernels", "ops", "model"):   # their real command lines ran and refused politely
        assert "no CUDA GPU" in status[p], (p, status[p])
    for p in ("info", "build", "tests"):
        assert status[p].startswith("ok"), (p, status[p])
    with tarfile.open(out / "logs.tar.gz") as t:
        names = t.getnames()
    assert {f"logs/{p}.log" for p in PARTS} <= set(names)
    with tarfile.open(out / "results.tar.gz") as t:
        t.getnames()
    assert (out / "gpu_choice.json").read_text().strip().startswith("{")
    assert not (ROOT / "build" / "build-dry").exists()
