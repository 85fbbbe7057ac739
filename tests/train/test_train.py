"""The trainer: exact resume after SIGKILL, rank equivalence (DDP, FSDP2 on gloo), bad input."""
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("PIL")

from support.training import TINY_MODEL, losses, tiny_run as _raw, write_config  # noqa: E402

from imagen_fast.data import collate, open_dataset, transform_for_stage  # noqa: E402
from imagen_fast.train import Trainer  # noqa: E402
from imagen_fast.train_config import config_from_dict  # noqa: E402


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    summary = Trainer(config_from_dict(_raw(straight))).run()
    assert summary["step"] == 6
    expected = losses(straight)

    killed = tmp_path / "killed"
    cfg_path = tmp_path / "cfg.toml"
    write_config(cfg_path, _raw(killed, steps=6))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "imagen_fast.cli", "train", "--config", str(cfg_path)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if (killed / "checkpoints" / "latest").exists() and metrics.exists() and \
                len(metrics.read_text().splitlines()) >= 3:      # past the step-2 checkpoint
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = max(losses(killed))
    assert done_before < 6

    Trainer(config_from_dict(_raw(killed)), resume=True).run()
    resumed = losses(killed)
    assert sorted(resumed) == list(range(1, 7)), "each step logged exactly once"
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    a = Trainer(config_from_dict(_raw(tmp_path / "a", steps=2)))
    a.run()
    b = Trainer(config_from_dict(_raw(tmp_path / "b", steps=2, grad_accum=2)))
    b.run()
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, raw, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(config_from_dict(raw))
    summary = trainer.run()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"summary": summary, "params": sd, "losses": losses(raw["log"]["out_dir"])}, out)
    torch.distributed.destroy_process_group()


def _rank_batches(raw, world):
    """The global batches a `world`-rank run sees, as one process: each rank's stream,
    concatenated in rank order."""
    cfg = config_from_dict(raw)
    per_rank = cfg.train.batch_size // world
    streams = []
    for r in range(world):
        ds = open_dataset(cfg.data.path, transform_for_stage(cfg.data.resolution), seed=cfg.train.seed,
                          rank=r, world_size=world)
        streams.append(iter(ds))
    while True:
        samples = []
        for it in streams:
            samples += [next(it) for _ in range(per_rank)]
        yield collate(samples)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, strategy):
    raw = _raw(tmp_path / "multi", steps=3)
    raw["distributed"] = {"strategy": strategy}
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_rank_main, args=(2, _free_port(), raw, str(out)), nprocs=2, join=True)
    multi = torch.load(out)

    single_raw = _raw(tmp_path / "single", steps=3)
    single = Trainer(config_from_dict(single_raw), batches=_rank_batches(single_raw, 2))
    single.run()
    single_losses = losses(tmp_path / "single")
    for step, loss in multi["losses"].items():
        assert loss == pytest.approx(single_losses[step], rel=1e-4), step
    for name, p in single.model.state_dict().items():
        torch.testing.assert_close(multi["params"][name], p, rtol=1e-4, atol=1e-5, msg=name)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    from imagen_fast.data import write_shapes
    write_shapes(tmp_path / "data", 8, seed=1, resolution=16, shard_size=8)
    folder = tmp_path / "folder"
    folder.mkdir()
    import tarfile
    for shard in sorted((tmp_path / "data").glob("*.tar")):
        with tarfile.open(shard) as tf:
            tf.extractall(folder, filter="data")
    pngs = sorted(folder.glob("*.png"))
    pngs[0].write_bytes(b"not an image")                 # corrupt image
    pngs[1].with_suffix(".txt").unlink()                 # no caption (nor a .json one)
    pngs[1].with_suffix(".json").unlink(missing_ok=True)
    raw = _raw(tmp_path / "run", steps=3)         # 12 samples: more than one epoch of 6
    raw["data"] = {"kind": "folder", "path": str(folder), "resolution": 16}
    trainer = Trainer(config_from_dict(raw))
    summary = trainer.run()
    assert summary["step"] == 3
    counts = trainer.dataset.skips.counts()
    assert trainer.skipped >= 2 and len([c for c in counts.values() if c]) == 2, trainer.dataset.skips.summary()


def test_checkpoint_for_another_model_is_refused(tmp_path):
    Trainer(config_from_dict(_raw(tmp_path / "run", steps=2))).run()
    raw = _raw(tmp_path / "run", steps=4)
    raw["model"] = {"preset": "tiny-base32", "overrides": dict(TINY_MODEL["overrides"], model_channels=8)}
    from imagen_fast.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="another model"):
        Trainer(config_from_dict(raw), resume=True)


def test_cli_bad_config_is_one_line(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('[data]\npath = "x"\n[train]\nlerning_rate = 1\n')
    r = subprocess.run([sys.executable, "-m", "imagen_fast.cli", "train", "--config", str(cfg)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown key train.lerning_rate" in r.stderr and "Traceback" not in r.stderr


def test_sample_grids_during_training(tmp_path):
    raw = _raw(tmp_path / "run", steps=2)
    raw["log"].update(sample_every=2, sample_steps=3, sample_prompts=["a red circle", "two blue squares"])
    Trainer(config_from_dict(raw)).run()
    from PIL import Image
    grid = Image.open(tmp_path / "run" / "samples" / "step_00000002.png")
    assert grid.size == (2 * 16, 16)


@pytest.mark.parametrize("train", [
    {"precision": "bf16", "optimizer": "adafactor"},
    {"precision": "fp16", "channels_last": False, "grad_clip": 0.0, "ema_decay": 0.0},
    {"compile": True, "lr_schedule": "constant"},
])
def test_training_options_run_and_learn(tmp_path, train):
    raw = _raw(tmp_path / "run", steps=3, **train)
    trainer = Trainer(config_from_dict(raw))
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.run()
    assert summary["step"] == 3 and math.isfinite(summary["loss"])
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no parameter moved"


def test_compiled_training_step_is_one_graph_without_recompiles(tmp_path):
    """train.compile: forward + loss one fullgraph graph (its backward derived by
    AOTAutograd), every draw a tensor: two micro-batches x 3 steps compile once and give
    the eager run's losses."""
    from torch._dynamo.utils import counters
    Trainer(config_from_dict(_raw(tmp_path / "eager", steps=3, grad_accum=2))).run()
    before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        Trainer(config_from_dict(_raw(tmp_path / "compiled", steps=3, grad_accum=2,
                                      compile={"backend": "aot_eager"}))).run()
    assert counters["stats"]["unique_graphs"] == before + 1
    want, got = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert list(got) == [1, 2, 3]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5)


def test_compiled_sample_grids_compile_their_step_once(tmp_path):
    from imagen_fast.diffusion.step import compiled_steps, graphs_compiled
    raw = _raw(tmp_path / "run", steps=2, compile={"backend": "eager"})
    raw["log"].update(sample_every=1, sample_steps=2, sample_prompts=["a red circle"])
    trainer = Trainer(config_from_dict(raw))
    with torch._dynamo.config.patch(error_on_recompile=True):
        trainer.run()
    assert (tmp_path / "run" / "samples" / "step_00000002.png").is_file()
    steps = list(compiled_steps(trainer.grid_model).values())
    assert len(steps) == 1 and graphs_compiled(steps[0]) == 1       # two grids, one graph


def test_disk_full_during_training_keeps_going_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from imagen_fast import checkpoint as ck
    raw = _raw(tmp_path / "run", steps=4)
    trainer = Trainer(config_from_dict(raw))
    real = ck.save_checkpoint

    def full_after_first(*a, **k):
        if a[1] > 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(ck, "save_checkpoint", full_after_first)
    assert trainer.run()["step"] == 4
    assert ck.latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000002"
