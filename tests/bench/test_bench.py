"""The benchmark harness's logic (not speeds): timing, the preset-derived shape table, the
case list, the tables, the choice entries, the memory probes."""
import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imagen_fast.bench import bench_model, bench_ops, harness, shapes
from imagen_fast.models import preset_config
from imagen_fast.ops import gpu_choice

ROOT = Path(__file__).resolve().parents[2]


def test_compare_times_each_candidate_per_call_and_interleaves():
    calls = []

    def slow(i):
        calls.append(("slow", i))
        time.sleep(0.002)

    def fast(i):
        calls.append(("fast", i))
    t = harness.compare({"slow": slow, "fast": fast}, rounds=5, min_round_s=0.004, warmup=1)
    assert set(t) == {"slow", "fast"} and t["slow"].rounds == 5
    assert t["slow"].median_ms >= 1.9 and t["slow"].median_ms > 10 * t["fast"].median_ms
    assert t["slow"].p10_ms <= t["slow"].median_ms <= t["slow"].p90_ms
    timed = [name for name, _ in calls[4:]]         # after warm-up and sizing
    switches = sum(a != b for a, b in zip(timed, timed[1:]))
    assert switches >= 4                            # rounds alternate between candidates
    indices = [i for name, i in calls[4:] if name == "fast"]
    assert len(set(indices)) == len(indices)        # every call gets a new index (input copy)


def test_copies_rotate_past_the_cache():
    assert harness.copies_for(1 << 30) == 2
    n = harness.copies_for(1 << 20)
    assert n * (1 << 20) >= harness.rotate_bytes() or n == 64


def test_shape_table_comes_from_the_model():
    cfg = preset_config("base64-small-efficient")
    calls = shapes.preset_calls("base64-small-efficient", text_len=64)
    gn = calls["group_norm_silu"]
    res = cfg["image_size"]
    # the levels run at H / 2^(k+1); the input/output stage at full resolution
    levels = {res // 2 ** (k + 1): ch for k, ch in enumerate(cfg["channels"])}
    for call in gn:
        assert call.n == 1 and call.groups == 32
        if call.h in levels and call.film:
            assert call.c == levels[call.h]
    assert {c.h for c in gn} == set(levels) | {res}
    # FiLM'd norms: two per ResBlock (norm2 only) -> one per block; count them
    blocks = 2 * sum(cfg["num_res_blocks"])
    assert sum(n for c, n in gn.items() if c.film) == blocks
    attn = calls["attention"]
    heads_dim = {(a.heads * a.d, a.lq) for a in attn if a.kind == "self+text"}
    for k, ch in enumerate(cfg["channels"]):
        r = res // 2 ** (k + 1)
        assert ((ch, r * r) in heads_dim) == cfg["self_attention"][k]
    for a in attn:
        if a.kind == "self+text":
            assert a.lk == a.lq + 64 and a.masked
        if a.kind == "pool":
            assert a.lq == 1 and a.lk == 64
    longer = shapes.preset_calls("base64-small-efficient", text_len=256)["attention"]
    assert {a.lk for a in longer if a.kind == "self+text"} == {a.lq + 256 for a in longer if a.kind == "self+text"}


def test_stage_calls_one_per_resolution_and_markdown():
    stages = shapes.stage_calls("tiny-sr64")
    hs = [c.h for c in stages]
    assert hs == sorted(set(hs), reverse=True)
    md = shapes.markdown(["tiny-base32", "tiny-sr128"], (64,))
    assert "| attention | tiny-sr128 |" in md and "cross" in md        # sr128 has cross-attention
    assert "| sampler_step | tiny-base32 | 1x3x32x32 |" in md


def test_case_lists_fit_the_device():
    quick = bench_ops.build_cases(torch.device("cpu"), True, bench_ops.OPS)
    assert {c.op for c in quick} == set(bench_ops.OPS) and len(quick) <= 12
    full = bench_ops.build_cases(torch.device("cpu"), False, bench_ops.OPS)
    assert all(c.size_ok(bench_ops.CPU_MAX_NUMEL, bench_ops.CPU_MAX_SCORES) for c in full)
    assert {c.shape[0] for c in full if c.op == "gn"} >= {1, 8, 64}       # the batch sweep
    assert {c.text_len for c in full if c.op == "attn"} == {64, 256}
    assert {c.mode for c in full if c.op == "attn"} == {"fwd", "fwd+bwd"}
    for op in ("gn", "rms"):                    # both layouts in float32 and bfloat16
        assert {(c.dtype, c.layout) for c in full if c.op == op} == {
            (dt, lay) for dt in (torch.float32, torch.bfloat16) for lay in ("NCHW", "NHWC")}
    keys = [(c.op, c.mode, c.shape, c.dtype, c.layout, c.masked, c.film) for c in full]
    assert len(keys) == len(set(keys))
    gpu = bench_ops.build_cases(torch.device("cuda"), False, ["gn"])
    assert gpu[0].dtype == torch.bfloat16 and gpu[0].layout == "NHWC"
    assert any(c.source.startswith("sr1024") for c in gpu)


def _record(op, mode, shape, ms, work=("bytes", 2e9), cls=None, layout="NHWC"):
    return {"op": op, "mode": mode, "shape": list(shape), "dtype": "bfloat16", "layout": layout,
            "source": "test", "masked": False, "text_len": 0, "groups": 32, "film": True,
            "work": list(work), "failed": {"sdpa flash": "RuntimeError: no"},
            "timings": {k: {"median_ms": v, "p10_ms": v, "p90_ms": v, "rounds": 3} for k, v in ms.items()},
            "roof": {"copy_gbs": 100.0, "matmul_gflops": 1000.0}, "choice_class": cls}


def test_tables_speedups_and_roofline():
    recs = [_record("gn", "fwd", (8, 64, 32, 32), {"imagen-fast": 10.0, "eager": 40.0, "compile": 20.0}),
            _record("attn", "fwd", (1, 2, 3, 4, 5), {"imagen-fast": 1.0, "eager": 3.0, "sdpa": 2.0,
                                                     "sdpa math": 4.0}, work=("flops", 1e9))]
    tables = {t.title.split()[0]: t for t in bench_ops.make_tables(recs, "cpu")}
    gn = tables["group_norm_silu"]
    row = dict(zip(gn.columns, gn.rows[0]))
    assert row["x eager"] == 4.0 and row["x compile"] == 2.0
    assert math.isclose(row["GB/s"], 200.0) and math.isclose(row["fraction of copy"], 2.0)
    at = tables["attention"]
    row = dict(zip(at.columns, at.rows[0]))
    assert row["x best SDPA"] == 2.0 and math.isclose(row["GFLOP/s"], 1000.0)
    assert math.isclose(row["fraction of matmul"], 1.0)
    assert any("sdpa flash" in n for n in at.notes)


def test_choice_entries_pick_the_faster_backend_per_class():
    x = torch.empty(8, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    cls = gpu_choice.shape_class("group_norm_silu_fwd", x)
    recs = [_record("gn", "fwd", (8, 64, 32, 32), {"imagen-fast": 1, "triton": 1.0, "cuda": 2.0}, cls=cls),
            _record("gn", "fwd+bwd", (8, 64, 32, 32), {"imagen-fast": 1, "triton": 5.0, "cuda": 3.5}, cls=cls),
            _record("gn", "fwd", (8, 64, 16, 16), {"imagen-fast": 1, "triton": 0.2}, cls=cls)]   # no cuda: ignored
    entries = {e["op"]: e for e in bench_ops.choice_entries(recs, "sm_90", "Test GPU", "abc")}
    assert entries["group_norm_silu_fwd"]["backend"] == "triton"
    bwd = entries["group_norm_silu_bwd"]                 # backward = fwd+bwd - fwd: 4.0 vs 1.5
    assert bwd["backend"] == "cuda" and bwd["ms"] == {"triton": 4.0, "cuda": 1.5}
    assert bwd["arch"] == "sm_90" and bwd["class"] == cls
    gpu_choice._validate(list(entries.values()), "test")


def test_run_case_records_every_candidate_on_cpu():
    for op, mode in (("rms", "fwd+bwd"), ("gn", "fwd")):    # both norms' candidates run
        case = bench_ops.Case(op, mode, (2, 8, 4, 4), torch.bfloat16, "NHWC", "test", groups=4)
        rec = bench_ops.run_case(case, torch.device("cpu"), rounds=3, min_round_s=0.0,
                                 roof={"copy_gbs": 10.0, "matmul_gflops": {}}, with_compile=False)
        assert set(rec["timings"]) == {"imagen-fast", "eager"} and not rec["failed"], rec["failed"]
    case = bench_ops.Case("thr", "fwd", (2, 3, 8, 8), torch.float32, "NCHW", "test")
    rec = bench_ops.run_case(case, torch.device("cpu"), rounds=3, min_round_s=0.0,
                             roof={"copy_gbs": 10.0, "matmul_gflops": {}}, with_compile=False)
    assert set(rec["timings"]) == {"imagen-fast", "eager"}
    assert rec["work"] == ["bytes", 2 * 2 * 3 * 8 * 8 * 4]
    json.dumps(rec)                                      # JSON-ready, for the results and --resume
    assert bench_ops.record_key(rec) == bench_ops.case_key("thr", "fwd", (2, 3, 8, 8), "float32",
                                                           "NCHW", False, 32, True)


def test_glibc_mmap_stats_and_peak_reset():
    stats = bench_model._glibc_mmap_stats()
    assert stats["max_mapped_mb"] >= stats["mapped_mb"] >= 0
    bench_model._reset_peak_rss()
    assert bench_model._status_mb("VmHWM") >= bench_model._status_mb("VmRSS") * 0.9


def test_bench_cli_refuses_cuda_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    r = subprocess.run([sys.executable, "-m", "imagen_fast.cli", "bench", "ops", "--device", "cuda"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_summary_table_ranges_and_drops_empty_columns():
    recs = [_record("gn", "fwd", (8, 64, 32, 32), {"imagen-fast": 10.0, "eager": 40.0}),
            _record("gn", "fwd", (8, 64, 16, 16), {"imagen-fast": 10.0, "eager": 20.0})]
    t = bench_ops.summary_table(recs)
    row = dict(zip(t.columns, t.rows[0]))
    assert row["cases"] == 2 and row["x eager"] == "2.00 - 4.00 (4.00)"
    assert "x compile" not in t.columns and "x best SDPA" not in t.columns


def test_results_go_to_the_named_directory(tmp_path):
    """write_results writes into the directory it is given (the default is relative to the
    working directory, never the package's own folder)."""
    table = harness.Table("t", ["a"])
    table.add(1.5)
    path = harness.write_results(tmp_path / "new" / "dir", "demo", {"cpu": "x", "busy": []}, [table], {"k": 1})
    assert path == tmp_path / "new" / "dir" / "demo.json"
    assert json.loads(path.read_text())["raw"] == {"k": 1}
    assert "| 1.5 |" in path.with_suffix(".md").read_text()
    assert not harness.DEFAULT_RESULTS.is_absolute()
    ap = argparse.ArgumentParser()
    harness.add_results_arg(ap)
    assert ap.parse_args([]).results_dir == harness.DEFAULT_RESULTS


def test_model_kernels_plain_variant_runs_the_same_model():
    """bench_model_kernels on the tiny preset: the plain-ops model computes what the
    package's ops compute (guided forward, first training loss); the table's ratios."""
    from imagen_fast.bench import bench_model_kernels as bmk
    for mode in bmk.MODES:
        runners = bmk.build_runners("tiny-base32", 1, mode, ("imagen-fast", "plain eager"))
        ours, plain = (runners[v](0) for v in ("imagen-fast", "plain eager"))
        assert bmk._diff(ours, ours) == 0.0 and bmk._diff(plain, ours) < 1e-3
    row = dict(preset="p", mode="sample", batch=1, median_ms=2.0, p10_ms=1.9, p90_ms=2.1, first_call_s=1.0,
               conv_share=0.5, max_abs_diff=0.0)
    t = bmk.make_table([dict(row, variant="imagen-fast"), dict(row, variant="plain eager", median_ms=5.0),
                        dict(preset="p", mode="sample", batch=1, variant="plain compiled", failed="x")], 3, 2)
    assert [dict(zip(t.columns, r))["x plain eager"] for r in t.rows[:2]] == [2.5, 1.0]
    assert any("plain compiled: not run" in n for n in t.notes)


def test_load_warning_only_above_the_core_count():
    assert harness.load_warning([1.0, 1.9], cpu_count=2) is None
    assert "LOADED MACHINE" in harness.load_warning([1.0, 15.0], cpu_count=2)


def _probe(t, load1, copy, busy_s, own_s):
    return {"time_s": t, "load1": load1, "copy_gbs": copy, "cpu": (busy_s, own_s)}


def test_busy_reasons_each_rule():
    """2 cores, 2 benchmark threads, a 100 s run: quiet, then each rule tripped alone."""
    quiet = harness.busy_reasons(_probe(0, 1.5, 24.5, 0, 0), _probe(100, 2.2, 22.0, 195, 190), 2, 2)
    assert quiet == []
    drift = harness.busy_reasons(_probe(0, 0.5, 24.5, 0, 0), _probe(100, 2.0, 18.0, 190, 190), 2, 2)
    assert len(drift) == 1 and "copy bandwidth 24.5 -> 18.0" in drift[0]
    # a rise is the start probe on cold memory, not contention
    assert harness.busy_reasons(_probe(0, 0.5, 24.0, 0, 0), _probe(100, 2.0, 37.0, 190, 190), 2, 2) == []
    load = harness.busy_reasons(_probe(0, 14.0, 24.5, 0, 0), _probe(100, 2.0, 24.0, 190, 190), 2, 2)
    assert len(load) == 1 and "load average 14.00" in load[0]
    # a training run on one core: others took 95 of the 200 core-seconds
    others = harness.busy_reasons(_probe(0, 2.0, 24.5, 0, 0), _probe(100, 2.9, 24.0, 195, 100), 2, 2)
    assert len(others) == 1 and "other processes took 48%" in others[0]
    no_proc = harness.busy_reasons(dict(_probe(0, 1.0, 24.5, 0, 0), cpu=None),
                                   dict(_probe(100, 1.0, 24.5, 0, 0), cpu=None), 2, 2)
    assert no_proc == []


def test_busy_run_is_written_only_as_a_draft(tmp_path, monkeypatch):
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    monkeypatch.setattr(harness, "cpu_times", lambda: None)
    table = harness.Table("t", ["a"], [[1]])
    with pytest.raises(ValueError, match="machine\\['busy'\\] is missing"):
        harness.write_results(tmp_path, "bench_x", {"cpu": "test"}, [table], {})
    copies = iter([24.0, 12.0])                     # injected: the bandwidth halves during the run
    w = harness.Watch(threads=2, measure_copy=lambda device: next(copies))
    w.start()
    assert len(w.stop()) == 1 and "copy bandwidth 24.0 -> 12.0" in w.reasons()[0]
    path = harness.write_results(tmp_path, "bench_x", {"cpu": "test", **w.fields()}, [table], {})
    assert path == tmp_path / "drafts" / "bench_x.json" and not (tmp_path / "bench_x.json").exists()
    assert "DRAFT" in path.with_suffix(".md").read_text() and json.loads(path.read_text())["draft"]
    steady = iter([24.0, 23.5])
    w = harness.Watch(threads=2, measure_copy=lambda device: next(steady))
    w.start()
    assert w.stop() == []
    path = harness.write_results(tmp_path, "bench_x", {"cpu": "test", **w.fields()}, [table], {})
    assert path == tmp_path / "bench_x.json" and "DRAFT" not in path.with_suffix(".md").read_text()


@pytest.mark.parametrize("lib", ["diffusers", "imagen-pytorch"])
@pytest.mark.parametrize("mode", ["train", "sample"])
def test_bench_patch_pairs_run_and_agree(lib, mode, monkeypatch):
    """Each timed pair of bench_patch builds, runs one call, and the accelerated copy
    agrees with the original (the agreement the benchmark records before timing)."""
    if lib == "diffusers":
        pytest.importorskip("diffusers")
    else:
        # through the peers' offline import (a plain import asks the hub for T5's config;
        # it passed before only when test_patch_imagen_pytorch.py had been collected first)
        from imagen_fast.patch._peers import import_imagen_pytorch
        try:
            import_imagen_pytorch()
        except ImportError as e:
            pytest.skip(f"imagen-pytorch not installed: {e}")
    from imagen_fast.bench import bench_patch
    monkeypatch.setattr(bench_patch, "RES", 32)      # the smallest size both U-Nets take
    make = bench_patch.diffusers_pair if lib == "diffusers" else bench_patch.imagen_pytorch_pair
    slow, fast, report, model = make(mode, 1)
    assert report.replaced, report.summary()
    diff = bench_patch._agreement(slow, fast)
    assert math.isfinite(diff) and diff < 1e-3, diff


def test_bench_overhead_candidates_compute_the_same():
    """bench_overhead: per case and mode, the op, the same call through the custom ops, the
    bare kernel functions and stock PyTorch give the same result (so the differences it
    reports are overhead, not different work); the table and its notes."""
    from imagen_fast.bench import bench_overhead as bo
    from support.device import require_backend
    require_backend("cpu")
    for case in bo.build_cases(quick=False):
        for mode in case.modes:
            cands = case.build(mode)
            assert set(cands) == set(bo.CANDIDATES) | ({bo.BARE} if mode == "fwd+bwd" else set())
            out = {name: fn(0) for name, fn in cands.items()}
            kern = out["kernel"]
            if mode == "fwd" and isinstance(kern, tuple):
                kern = kern[:1]                                   # (y, statistics...) -> y
            as_list = lambda r: list(r) if isinstance(r, (tuple, list)) else [r]  # noqa: E731
            for name in ("custom op", "kernel", "torch", bo.BARE):
                if name not in out:
                    continue
                got = as_list(kern if name == "kernel" else out[name])
                want = as_list(out["op"])
                assert len(got) == len(want), (case.name, mode, name)
                for g, w in zip(got, want):
                    if name == "torch" or (case.name == "attention" and name in ("custom op", bo.BARE)):
                        # attention: the eager op runs its eager path, the custom op its own kernels
                        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
                    else:
                        assert torch.equal(g, w), (case.name, mode, name)
    rows = bo.run(bo.build_cases(quick=True)[:1], rounds=2, min_round_s=0.0)
    assert [r["mode"] for r in rows] == ["fwd", "fwd+bwd"]
    assert all(abs(r["overhead_us"] - (r["op_us"] - r["kernel_us"])) <= 0.02 for r in rows)
    table = bo.make_table(rows, threads=1)
    assert len(table.rows) == 2 and any("per 4-image sample" in n for n in table.notes)
