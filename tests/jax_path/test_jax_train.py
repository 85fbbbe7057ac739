"""`imagen-fast train --backend jax`: the sharded step equals the single-device step
(8 fake CPU devices, in a subprocess), exact resume, checkpoints that torch loads and
resumes, config errors; and a torch-only run never imports JAX."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.jax_util import jax  # noqa: F401  (skips without JAX)
from support.training import TINY_MODEL, losses, write_config

from imagen_fast import checkpoint as ck
from imagen_fast import cli
from imagen_fast.models import build_unet
from imagen_fast.train import Trainer
from imagen_fast.train_config import config_from_dict

pytest.importorskip("PIL")
BATCH = 16
ROOT = Path(__file__).resolve().parents[2]


def base_raw(out_dir, steps=2, **train):
    return {
        "model": TINY_MODEL,
        "data": {"kind": "shapes", "path": "shapes:64:3", "resolution": 16},
        "text": {"encoder": "hash:16", "max_length": 8},
        "train": {"steps": steps, "batch_size": BATCH, "warmup_steps": 2, "lr": 1e-3, "seed": 11,
                  "ema_decay": 0.9, **train},
        "log": {"out_dir": str(out_dir), "log_every": 1, "ckpt_every": 2, "keep": 3,
                "progress": False, "tensorboard": False},
    }


def fixed_batches():
    """The same batch forever: images in [-1, 1] and captions, as the data loader gives."""
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(BATCH, 3, 16, 16, generator=g) * 2 - 1,
             "caption": [f"caption number {i}" for i in range(BATCH)]}
    while True:
        yield batch


def test_sharded_step_equals_single_device_step(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "jax_path" / "jax_sharded_check.py"), str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["mesh"] == {"data": 2, "fsdp": 4}
    assert out["num_sharded"] > 0 and out["shard_fraction"] == pytest.approx(0.25)
    # data parallel + sharded parameters + 2 micro-batches = one device, one batch
    assert out["loss_mesh"] == pytest.approx(out["loss_single"], rel=1e-5)
    assert out["grad_norm_mesh"] == pytest.approx(out["grad_norm_single"], rel=1e-4)
    assert out["max_param_delta"] < 1e-6


def test_cli_train_resume_and_torch_shares_the_checkpoints(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    for out, steps in ((straight, 4), (split, 2)):
        write_config(tmp_path / "cfg.toml", base_raw(out, steps=steps))
        assert cli.main(["train", "--config", str(tmp_path / "cfg.toml"), "--backend", "jax"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["mesh"] == {"data": 1, "fsdp": 1}
    write_config(tmp_path / "cfg.toml", base_raw(split, steps=4))
    assert cli.main(["train", "--config", str(tmp_path / "cfg.toml"), "--backend", "jax",
                     "--resume"]) == 0
    expected, resumed = losses(straight), losses(split)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in expected:                    # the same data and draws after the restart
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), step

    # the JAX checkpoint is a torch checkpoint: weights load as they are ...
    latest = ck.latest_checkpoint(split / "checkpoints")
    data = ck.load_checkpoint(latest)
    assert data["state"]["backend"] == "jax" and data["state"]["step"] == 4
    model = build_unet(TINY_MODEL["preset"], **TINY_MODEL["overrides"])
    model.load_state_dict(data["model"])
    assert set(data["ema"]) == set(data["model"])
    # ... and the torch trainer resumes it (AdamW state included) and goes on
    trainer = Trainer(config_from_dict(base_raw(split, steps=5)), resume=True)
    assert trainer.step == 4
    state = trainer.optimizer.state_dict()["state"]
    assert len(state) == len(list(model.parameters()))
    assert all(float(s["step"]) == 4.0 and s["exp_avg_sq"].abs().sum() > 0 for s in state.values())
    trainer.run()
    assert max(losses(split)) == 5 and np.isfinite(losses(split)[5])


@pytest.mark.parametrize("key,value,match", [("precision", "fp16", "bf16"),
                                             ("optimizer", "adafactor", "adamw")])
def test_cli_unsupported_settings_are_one_line_errors(tmp_path, capsys, key, value, match):
    write_config(tmp_path / "cfg.toml", base_raw(tmp_path / "run", **{key: value}))
    assert cli.main(["train", "--config", str(tmp_path / "cfg.toml"), "--backend", "jax"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and f"train.{key}" in err


def test_mesh_shapes_and_parameter_sharding():
    from imagen_fast.jax import sharding

    assert sharding.mesh_shape("ddp", [], 8) == (8, 1)
    assert sharding.mesh_shape("fsdp", [], 8) == (1, 8)
    assert sharding.mesh_shape("ddp", [2, 4], 8) == (2, 4)
    with pytest.raises(ValueError, match="distributed.mesh"):
        sharding.mesh_shape("ddp", [2, 3], 8)
    spec = sharding.param_spec((3, 3, 256, 512), 4)
    assert tuple(spec) == (None, None, None, "fsdp")
    assert tuple(sharding.param_spec((3, 3, 256, 510), 4)) == (None, None, "fsdp", None)
    assert tuple(sharding.param_spec((64,), 4)) == ()          # small: replicated
    assert tuple(sharding.param_spec((3, 3, 256, 512), 1)) == ()


def test_torch_only_runs_never_import_jax(tmp_path):
    """With JAX unimportable, everything torch works and `--backend jax` says what to
    install in one line; with JAX installed, the torch modules still do not load it."""
    code = f"""
import sys
sys.modules["jax"] = None          # `import jax` now raises ImportError
from imagen_fast import cli
import imagen_fast.ops, imagen_fast.models, imagen_fast.cascade, imagen_fast.pipeline, imagen_fast.train
import imagen_fast.diffusion, imagen_fast.text, imagen_fast.data
assert cli.main(["info"]) == 0 and cli.main(["presets"]) == 0
assert cli.main(["train", "--config", {str(tmp_path / 'cfg.toml')!r}, "--backend", "jax"]) == 2
"""
    write_config(tmp_path / "cfg.toml", base_raw(tmp_path / "run"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pip install 'imagen-fast[jax]'" in r.stderr
    code = ("import sys, imagen_fast.cli, imagen_fast.cascade, imagen_fast.pipeline, imagen_fast.train\n"
            "imagen_fast.cli.main(['info'])\n"
            "assert 'jax' not in sys.modules and 'flax' not in sys.modules, 'jax was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
