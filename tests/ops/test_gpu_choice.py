"""The triton/cuda choice of the ops layer, from a synthetic measured table (no GPU needed)."""
import json
import logging

import pytest
import torch

from imagen_fast.kernels import registry
from imagen_fast.ops import dispatch, gpu_choice


def _entry(op, backend, cls, arch="sm_90", ms=None):
    return {"op": op, "arch": arch, "gpu": "Test GPU", "class": cls, "backend": backend,
            "ms": ms or {"triton": 1.0, "cuda": 2.0}}


def _gn_class(shape=(8, 512, 32, 32), dtype=torch.bfloat16, channels_last=True):
    x = torch.empty(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return gpu_choice.shape_class("group_norm_silu_fwd", x), x


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    monkeypatch.setattr(gpu_choice, "_picked", {})
    monkeypatch.setattr(gpu_choice, "_logged", set())
    monkeypatch.setattr(gpu_choice, "_tables", {})


def test_shape_class_separates_layout_dtype_and_size():
    nhwc, _ = _gn_class()
    nchw, _ = _gn_class(channels_last=False)
    assert nhwc["layout"] == "nhwc" and nchw["layout"] == "nchw"
    assert nhwc["dtype"] == "bfloat16"
    assert nhwc["numel_bits"] == (8 * 512 * 32 * 32).bit_length()
    assert nhwc["channels_bits"] == (512).bit_length()
    thr = gpu_choice.shape_class("dynamic_threshold", torch.empty(8, 3, 64, 64))
    assert thr == {"dtype": "float32", "per_sample_bits": (3 * 64 * 64).bit_length(),
                   "batch_bits": (8).bit_length()}
    with pytest.raises(ValueError, match="op must be one of"):
        gpu_choice.shape_class("attention_fwd", torch.empty(1, 1, 1, 1))


def test_exact_class_takes_the_measured_winner():
    cls, _ = _gn_class()
    entries = [_entry("group_norm_silu_fwd", "cuda", cls, ms={"triton": 0.3, "cuda": 0.2})]
    backend, how, why = gpu_choice.choose("group_norm_silu_fwd", "sm_90", cls, entries)
    assert (backend, how) == ("cuda", "measured")
    assert "cuda 0.2 ms" in why and "Test GPU" in why


def test_nearest_class_on_the_same_gpu_and_dtype_layout():
    cls, _ = _gn_class()
    near = dict(cls, numel_bits=cls["numel_bits"] + 1)
    far = dict(cls, numel_bits=cls["numel_bits"] + 5)
    entries = [_entry("group_norm_silu_fwd", "triton", far),
               _entry("group_norm_silu_fwd", "cuda", near),
               _entry("group_norm_silu_fwd", "triton", dict(cls, layout="nchw"))]
    backend, how, why = gpu_choice.choose("group_norm_silu_fwd", "sm_90", cls, entries)
    assert (backend, how) == ("cuda", "nearest")
    assert "nearest measured shape class" in why


def test_unmeasured_gpu_or_dtype_uses_the_default_order_and_says_why():
    cls, _ = _gn_class()
    entries = [_entry("group_norm_silu_fwd", "cuda", cls, arch="sm_80")]
    backend, how, why = gpu_choice.choose("group_norm_silu_fwd", "sm_90", cls, entries)
    assert (backend, how) == (gpu_choice.GPU_BACKENDS[0], "default")
    assert "nothing measured for group_norm_silu_fwd on sm_90" in why
    fp16 = dict(cls, dtype="float16")
    entries = [_entry("group_norm_silu_fwd", "cuda", cls)]
    backend, how, why = gpu_choice.choose("group_norm_silu_fwd", "sm_90", fp16, entries)
    assert how == "default" and "no measurement" in why
    # another op's entries do not count
    backend, how, _ = gpu_choice.choose("group_norm_silu_bwd", "sm_90", cls, entries)
    assert how == "default"


def test_pick_logs_once_when_not_measured(tmp_path, monkeypatch, caplog):
    cls, x = _gn_class()
    table = tmp_path / "choice.json"
    gpu_choice.write_table([_entry("group_norm_silu_fwd", "cuda", cls)], table)
    monkeypatch.setenv("IMAGEN_FAST_GPU_CHOICE", str(table))
    with caplog.at_level(logging.INFO, logger="imagen_fast"):
        assert gpu_choice.pick("group_norm_silu_fwd", "sm_90", x) == "cuda"
        assert not caplog.records                                   # measured: silent
        for _ in range(3):
            assert gpu_choice.pick("group_norm_silu_fwd", "sm_100", x, "Other GPU") == "triton"
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1
    assert "sm_100" in msgs[0] and "'triton'" in msgs[0] and "nothing measured" in msgs[0]
    assert caplog.records[0].levelno == logging.WARNING


def test_table_round_trip_merge_and_validation(tmp_path):
    cls, _ = _gn_class()
    path = tmp_path / "t.json"
    old = [_entry("group_norm_silu_fwd", "triton", cls), _entry("sampler_step", "cuda", {"dtype": "float32"})]
    new = [_entry("group_norm_silu_fwd", "cuda", cls)]
    merged = gpu_choice.merge_entries(old, new)
    assert len(merged) == 2
    assert [e["backend"] for e in merged if e["op"] == "group_norm_silu_fwd"] == ["cuda"]
    gpu_choice.write_table(merged, path)
    assert gpu_choice.read_table(path) == merged
    assert gpu_choice.read_table(tmp_path / "missing.json") == []
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        gpu_choice.read_table(path)
    path.write_text(json.dumps({"version": 1, "entries": [dict(new[0], backend="cpu")]}))
    with pytest.raises(ValueError, match="backend must be one of"):
        gpu_choice.read_table(path)
    path.write_text(json.dumps({"version": 7, "entries": []}))
    with pytest.raises(ValueError, match="version"):
        gpu_choice.read_table(path)


def test_committed_table_is_valid():
    entries = gpu_choice.read_table(gpu_choice.TABLE_PATH)
    for e in entries:
        assert e["op"] in gpu_choice.CHOSEN_OPS and e["arch"].startswith("sm_")


def test_resolve_on_a_cuda_device_follows_the_table(tmp_path, monkeypatch):
    """dispatch.resolve with both GPU backends able to serve: the table decides, and an
    explicit backend still wins over it."""
    dispatch.available_backends()          # load the real backends first: they would overwrite the fakes

    def fake(name):
        def fn(*a):
            return name
        return fn
    for b in ("triton", "cuda"):
        monkeypatch.setitem(registry.implementations, ("dynamic_threshold", b), registry.Impl(fake(b), lambda *a: None))
    monkeypatch.setattr(dispatch, "_unavailable", {})
    monkeypatch.setattr(dispatch, "_reason", lambda op, b, dev, args: None)
    monkeypatch.setattr(gpu_choice, "arch_of", lambda device: ("sm_90", "Test GPU"))
    x = torch.empty(8, 3, 64, 64)
    cls = gpu_choice.shape_class("dynamic_threshold", x)
    table = tmp_path / "choice.json"
    monkeypatch.setenv("IMAGEN_FAST_GPU_CHOICE", str(table))
    cuda = torch.device("cuda")
    for winner in ("cuda", "triton"):
        gpu_choice.write_table([_entry("dynamic_threshold", winner, cls)], table)
        assert dispatch.resolve("dynamic_threshold", cuda, x)() == winner
    with dispatch.use_backend("cuda"):
        assert dispatch.resolve("dynamic_threshold", cuda, x)() == "cuda"
