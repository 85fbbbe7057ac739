"""Device meshes and parameter sharding for the JAX train step.

A mesh has two axes, both ``AxisType.Auto`` (the compiler propagates shardings and
inserts the collectives):

* ``"data"``: data parallelism; parameters are replicated along it;
* ``"fsdp"``: parameter sharding (FSDP / ZeRO-3 style): every large parameter and its
  optimizer and EMA state is split along one of its dimensions across this axis and
  gathered when a layer needs it; gradients are reduce-scattered back.

The batch is split over both axes (each device gets batch / devices examples).

Mesh shapes for TPU-v4 slices (4 chips per host; ``jax.devices()`` counts chips):

    v4-8    4 chips,   1 host:   (data, fsdp) = (4, 1)  DDP for models that fit a chip,
                                                (1, 4)  or sharded
    v4-32   16 chips,  4 hosts:  (4, 4)  or (1, 16)
    v4-256  128 chips, 32 hosts: (8, 16) for the 2B base model (params, Adam state and
                                 EMA, 2.2B x 16 bytes, split 16 ways), (1, 128) for the
                                 largest per-chip memory saving
    (the paper's 256 chips would be a v4-512 slice: (16, 16))

Multi-host: every host runs the same program; ``initialize_distributed`` calls
``jax.distributed.initialize`` (auto-detected on Cloud TPU; coordinator address,
process count and id otherwise) before anything touches a device.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
# Parameters below this many elements stay replicated: sharding them saves nothing
# and costs a gather per use.
MIN_SHARDED_SIZE = 1 << 14


def mesh_shape(strategy: str, explicit: Sequence[int], num_devices: int) -> Tuple[int, int]:
    """(data, fsdp): ``explicit`` = [data, fsdp] when given (its product must be the
    device count), else all devices on "data" for "ddp" and on "fsdp" for "fsdp"."""
    if explicit:
        if len(explicit) != 2 or any(int(v) < 1 for v in explicit):
            raise ValueError(f"distributed.mesh must be [data, fsdp] with positive sizes, "
                             f"got {list(explicit)}")
        data, fsdp = (int(v) for v in explicit)
        if data * fsdp != num_devices:
            raise ValueError(f"distributed.mesh {data} x {fsdp} = {data * fsdp} devices, but "
                             f"{num_devices} are available")
        return data, fsdp
    if strategy == "fsdp":
        return 1, num_devices
    return num_devices, 1


def make_mesh(data: int, fsdp: int, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((data, fsdp), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: data * fsdp])


def param_spec(shape: Sequence[int], fsdp: int) -> PartitionSpec:
    """Shard the largest dimension divisible by the fsdp size; replicate small arrays."""
    size = 1
    for s in shape:
        size *= s
    if fsdp == 1 or size < MIN_SHARDED_SIZE:
        return PartitionSpec()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % fsdp == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def tree_shardings(tree, mesh: Mesh):
    """A NamedSharding per array leaf of ``tree`` (parameter-like state)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda a: NamedSharding(mesh, param_spec(a.shape, fsdp)), tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over every device, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def initialize_distributed(coordinator: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
    """Start JAX's multi-host runtime. With no arguments the cluster is detected
    (Cloud TPU, SLURM, ...); otherwise all three describe it. Call once per process,
    before any device is used."""
    kwargs = {}
    if coordinator:
        if num_processes < 1 or process_id < 0:
            raise ValueError("distributed.coordinator needs distributed.num_processes and "
                             "distributed.process_id")
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                      process_id=process_id)
    jax.distributed.initialize(**kwargs)


def local_batch(global_batch: int) -> Tuple[int, Optional[str]]:
    """This process's share of the global batch, or an error message."""
    n = jax.process_count()
    if global_batch % n:
        return 0, f"train.batch_size={global_batch} must be divisible by the {n} processes"
    return global_batch // n, None
