"""Run by test_jax_train in a fresh process: 8 fake CPU devices must be configured
before JAX starts. One train step on a (data=2, fsdp=4) mesh with two accumulated
micro-batches against the same step on one device with the whole batch; prints
the comparison as JSON."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                   # test_jax_train
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: support
from test_jax_train import BATCH, base_raw, fixed_batches

from imagen_fast.jax import sharding
from imagen_fast.jax.train import JaxTrainer
from imagen_fast.train_config import config_from_dict

sharding.MIN_SHARDED_SIZE = 256          # the test model is tiny: shard it anyway


def one_step(raw, devices):
    trainer = JaxTrainer(config_from_dict(raw), batches=fixed_batches(), devices=devices)
    metrics = trainer.train_step()
    return trainer, metrics


def main(out_dir):
    raw = base_raw(out_dir)
    single, m1 = one_step(raw, jax.devices()[:1])
    raw["distributed"] = {"mesh": [2, 4]}
    raw["train"]["grad_accum"] = 2
    mesh, m8 = one_step(raw, jax.devices())
    p1 = jax.tree_util.tree_leaves(jax.device_get(single.state["params"]))
    p8_arrays = jax.tree_util.tree_leaves(mesh.state["params"])
    p8 = jax.tree_util.tree_leaves(jax.device_get(mesh.state["params"]))
    sharded = [a for a in p8_arrays if "fsdp" in str(a.sharding.spec)]
    deltas = [float(np.abs(a - b).max()) for a, b in zip(p1, p8)]
    print(json.dumps({
        "devices": len(jax.devices()), "mesh": dict(mesh.mesh.shape), "batch": BATCH,
        "loss_single": m1["loss"], "loss_mesh": m8["loss"],
        "grad_norm_single": m1["grad_norm"], "grad_norm_mesh": m8["grad_norm"],
        "max_param_delta": max(deltas), "num_params": len(p8), "num_sharded": len(sharded),
        "shard_fraction": min(s.data.size / a.size for a in sharded for s in a.addressable_shards),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
