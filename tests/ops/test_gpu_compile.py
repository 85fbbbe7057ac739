"""The ahead-of-time GPU compile audit (benchmarks/gpu_compile.py).

Triton's interpreter, which runs the kernels everywhere else in this suite, accepts
programs the GPU compiler rejects and shows nothing of registers or spills. Here the
real compiler runs for A100 (sm_80) and H100 (sm_90a) on the CPU: the CI subset of the
audit (the configs the last full audit found heaviest, recaptured from the current
launch code, plus every kernel and role at least once) must compile, fit the card's
shared memory, and not spill in any fixed or default configuration.
The full audit: `make gpu-compile` (report in benchmarks/results/gpu_compile.md).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_compile_report as report  # noqa: E402

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="the triton package is not installed")


def _run_audit(*args, timeout=900):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)     # the compiler, not the interpreter
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_compile", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@needs_triton
def test_ci_subset_compiles_for_sm80_and_sm90_without_spills():
    r = _run_audit("--subset", "ci", "--check", "--no-report", "--no-cuda")
    out = r.stdout + r.stderr
    violations = [ln for ln in out.splitlines() if ln.startswith("VIOLATION")]
    assert r.returncode == 0 and not violations, "\n".join(violations) or out[-4000:]
    for cap in (80, 90):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"sm_{cap}: ") and "configs," in ln)
        assert " 0 compile failures" in line and " 0 spilling launched" in line, line


def test_csrc_cuda_compiles_for_sm80_and_sm90a_without_spills():
    """nvcc's ptxas report for the GroupNorm kernels of the float32 and 16-bit builds (the
    others share their templates) and the threshold kernels: no errors, no spills."""
    from benchmarks import gpu_compile as gc
    if gc.nvcc_path() is None:
        pytest.skip("nvcc not found (CUDA_HOME/bin or PATH): csrc/cuda cannot be compiled here")
    cuda = gc.audit_cuda(ROOT, only=["group_norm_f32.cu", "group_norm_bf16.cu", "threshold.cu"])
    assert {(f["file"], f["arch"]) for f in cuda["files"]} == {
        (n, a) for n in ("group_norm_f32.cu", "group_norm_bf16.cu", "threshold.cu")
        for a in ("sm_80", "sm_90a")}
    assert all(f["functions"] for f in cuda["files"] if f["ok"])
    assert report.cuda_problems(cuda) == []


def _row(**kw):
    r = dict(target=80, kernel="k.x_kernel", config="fp32 BM=64 w4s2", role="default",
             cases=["case"], group="case", smem_limit=1000, ok=True, error="", regs=100,
             stack=0, spill_stores=0, spill_loads=0, shared=100, seconds=0.1)
    r.update(kw)
    return r


def test_rules_fail_on_errors_shared_memory_and_launched_spills_only():
    good = _row()
    assert report.problems([good]) == []
    assert "does not compile: boom" in report.problems([_row(ok=False, error="boom")])[0]
    assert "shared memory" in report.problems([_row(shared=1001)])[0]
    assert "spills 8 B" in report.problems([_row(spill_stores=8, spill_loads=8)])[0]
    assert "spills" in report.problems([_row(role="fixed", spill_loads=4)])[0]
    # an autotuner candidate may spill (the tuner times it), but must compile and fit
    assert report.problems([_row(role="candidate", spill_stores=8)]) == []
    assert report.problems([_row(role="candidate", ok=False, error="x")])
    s = report.summary([good, _row(role="candidate", spill_stores=64, config="c"),
                        _row(ok=False, error="x"), _row(target=90)], 80)
    assert (s["configs"], s["failures"], s["spilling_launched"], s["spilling_candidates"],
            s["largest_spill"], s["largest_launched_spill"]) == (3, 1, 0, 1, 64, 0)


def test_ci_picks_name_the_heaviest_launched_configs_and_the_largest_candidate():
    rows = [_row(regs=r, group=f"g{r}", config=f"c{r}") for r in (40, 200, 120)]
    rows.append(_row(role="candidate", shared=900, config="big", group="gc"))
    rows.append(_row(role="candidate", shared=10, config="small", group="gc"))
    picks = report.ci_picks(rows, [80])
    assert [(p["group"], p["launched"], p["config"]) for p in picks] == [
        ("g200", True, "c200"), ("g120", True, "c120"), ("gc", False, "big")]


def test_ptxas_and_nvcc_reports_are_parsed():
    from benchmarks import gpu_compile as gc
    log = ("ptxas info    : 11 bytes gmem, 8 bytes cmem[4]\n"
           "ptxas info    : Compiling entry function '_attn_fwd_kernel' for 'sm_80'\n"
           "ptxas info    : Function properties for _attn_fwd_kernel\n"
           "    25344 bytes stack frame, 51460 bytes spill stores, 94224 bytes spill loads\n"
           "ptxas info    : Used 32 registers, used 1 barriers, 504 bytes cmem[0]\n")
    assert gc.parse_ptxas(log) == dict(regs=32, stack=25344, spill_stores=51460,
                                       spill_loads=94224)
    with pytest.raises(ValueError):
        gc.parse_ptxas("ptxas fatal : something")
    nv = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'\n"
          "ptxas info    : Function properties for _Z3fooPf\n"
          "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
          "ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 380 bytes cmem[0]\n")
    (f,) = gc.parse_nvcc_report(nv)
    assert (f["regs"], f["smem"], f["spill_stores"]) == (40, 1024, 0)
    assert f["function"].startswith("foo")


def test_compile_errors_are_reported_by_their_message_line():
    from benchmarks import gpu_compile as gc

    class CompilationError(Exception):
        def __init__(self, msg):
            self.error_message = msg
    try:
        try:
            raise CompilationError("Loop-carried variable _ has initial type int32 but is "
                                   "re-assigned to fp32 in loop!")
        except CompilationError as inner:
            raise CompilationError(None) from inner
    except CompilationError as e:
        assert gc.error_line(e).startswith("Loop-carried variable _ has initial type int32")


def test_a_partial_audit_says_what_it_has_not_compiled():
    cov = {"80": {"k.a_kernel": [3, 3, 5, 1], "k.b_kernel": [2, 2, 0, 0]},
           "90": {"k.a_kernel": [3, 2, 5, 5]}}
    assert report.not_compiled(cov) == [
        "sm_80 k.a_kernel: 0 of 3 launched and 4 of 5 candidate configs not compiled yet",
        "sm_90 k.a_kernel: 1 of 3 launched and 0 of 5 candidate configs not compiled yet"]
    assert report.coverage_totals(cov, 80) == [5, 5, 5, 1]
    audit = dict(rows=[_row()], targets=[dict(cap=80, card="A100", arch="sm_80",
                                              smem_per_block=1000)],
                 triton="3.x", scope=dict(presets=["p"], text_lens=[1], gn_batches=[1],
                                          attn_batches=[1], image_batches=[1], dtypes=["f"]),
                 coverage={"80": cov["80"]}, unaudited=[])
    md = report.markdown(audit, {})
    assert "**This report is partial**" in md and "4 of 5 candidate configs not compiled" in md
    audit["coverage"] = {"80": {"k.a_kernel": [3, 3, 5, 5]}}
    assert "Every captured configuration was compiled." in report.markdown(audit, {})


def test_compile_order_puts_launched_first_and_takes_every_kernel_in_turn():
    from benchmarks import gpu_compile as gc

    class S:
        def __init__(self, kernel, role):
            self.kernel, self.role = kernel, role
    t80, t90 = gc.TARGETS[80], gc.TARGETS[90]
    work = ([(S("a", "default"), t80)] * 3 + [(S("b", "fixed"), t80)] * 2
            + [(S("a", "candidate"), t80)] + [(S("a", "default"), t90)])
    order = [(s.kernel, s.role, t.cap) for s, t in gc.compile_order(work)]
    assert order == [("a", "default", 80), ("b", "fixed", 80), ("a", "default", 90),
                     ("a", "default", 80), ("b", "fixed", 80), ("a", "default", 80),
                     ("a", "candidate", 80)]
