import errno
import random

import numpy as np
import pytest
import torch

from imagen_fast import checkpoint as ck


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    return m, opt


def _train_step(m, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g)
    loss = (m(x) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_save_load_resume_is_exact(tmp_path):
    m, opt = _model_and_opt()
    for s in range(3):
        _train_step(m, opt, s)
    torch.manual_seed(5)
    random.seed(6)
    np.random.seed(7)
    ck.save_checkpoint(tmp_path, 3, model=m.state_dict(), optimizer=opt.state_dict(),
                       state={"rng": ck.capture_rng_state(), "data_position": 48})
    expected = [_train_step(m, opt, s) for s in range(3, 6)]
    expected_draws = (torch.rand(3), random.random(), np.random.rand())

    m2, opt2 = _model_and_opt(seed=99)            # different init: everything must come back
    loaded = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))
    ck.check_state_dict_matches(m2, loaded["model"], "checkpoint")
    m2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    ck.restore_rng_state(loaded["state"]["rng"])
    assert loaded["state"]["step"] == 3 and loaded["state"]["data_position"] == 48
    draws = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]
    assert [_train_step(m2, opt2, s) for s in range(3, 6)] == expected


def test_keep_last_k_and_latest_pointer(tmp_path):
    m, _ = _model_and_opt()
    for step in (10, 20, 30, 40):
        ck.save_checkpoint(tmp_path, step, model=m.state_dict(), state={}, keep=2)
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert names == ["step_00000030", "step_00000040"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000040"


def test_disk_full_while_saving_keeps_previous(tmp_path, monkeypatch):
    m, opt = _model_and_opt()
    ck.save_checkpoint(tmp_path, 1, model=m.state_dict(), optimizer=opt.state_dict(), state={})
    real_save = ck.save_file
    calls = {"n": 0}

    def failing_save(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:                      # the optimizer file: disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(ck, "save_file", failing_save)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, 2, model=m.state_dict(), optimizer=opt.state_dict(), state={})
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000001"]
    assert ck.latest_checkpoint(tmp_path).name == "step_00000001"
    assert not list(tmp_path.glob(".step_*"))          # no partial directory left
    ck.load_checkpoint(ck.latest_checkpoint(tmp_path))  # and it still loads


def test_killed_writer_leftovers_are_ignored(tmp_path):
    m, _ = _model_and_opt()
    ck.save_checkpoint(tmp_path, 1, model=m.state_dict(), state={})
    partial = tmp_path / ".step_00000002.tmp-12345"      # a writer killed mid-way
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"garbage")
    stale = tmp_path / "step_00000003"                   # a directory without state.json
    stale.mkdir()
    assert ck.latest_checkpoint(tmp_path).name == "step_00000001"
    (tmp_path / "latest").write_text("step_00000009\n")  # pointer to something missing
    assert ck.latest_checkpoint(tmp_path).name == "step_00000001"


def test_wrong_architecture_is_refused_by_name(tmp_path):
    m, _ = _model_and_opt()
    other = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))
    with pytest.raises(ck.CheckpointError, match=r"0\.weight: checkpoint \(8, 4\) vs model \(16, 4\)"):
        ck.check_state_dict_matches(other, m.state_dict(), "checkpoint")
    with pytest.raises(ck.CheckpointError, match="missing"):
        ck.check_state_dict_matches(m, {"0.weight": torch.zeros(8, 4)}, "checkpoint")
