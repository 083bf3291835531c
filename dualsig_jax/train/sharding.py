"""Devices, hosts and the data-parallel mesh.

One `jax.jit` step over a 1-D `Mesh` named 'data': parameters and optimizer state replicated,
batches split along their leading axis. The same code runs on 1 CPU, 8 fake CPU devices, a GPU
host or a TPU pod slice; multi-host runs start `jax.distributed` from the environment.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def maybe_initialize_distributed() -> bool:
  """Starts `jax.distributed` when the environment asks for it; returns True if it did.

  Asked for by `JAX_COORDINATOR_ADDRESS` (+ `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, optional
  `JAX_LOCAL_DEVICE_IDS`), or by `DUALSIG_DISTRIBUTED=1` on platforms where JAX detects the
  cluster itself (TPU pod slices, SLURM, Open MPI).
  """
  if jax.distributed.is_initialized():
    return True
  addr = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if addr:
    kwargs = dict(
      coordinator_address=addr,
      num_processes=int(os.environ['JAX_NUM_PROCESSES']),
      process_id=int(os.environ['JAX_PROCESS_ID']),
    )
    if os.environ.get('JAX_LOCAL_DEVICE_IDS'):
      kwargs['local_device_ids'] = [int(i) for i in os.environ['JAX_LOCAL_DEVICE_IDS'].split(',')]
    if jax.config.jax_platforms in (None, '', 'cpu') or os.environ.get('JAX_PLATFORMS') == 'cpu':
      # CPU-only multi-process runs need a collectives backend for cross-process reductions.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(**kwargs)
    return True
  if os.environ.get('DUALSIG_DISTRIBUTED') == '1':
    jax.distributed.initialize()
    return True
  return False


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process, axis 'data'."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(global_batch: int, mesh: Mesh, name: str = 'input.batch_size') -> int:
  """Returns the per-process batch; raises ValueError (`defaults.BatchSplitError`) when the
  global batch (config field `name`) cannot be split evenly over the mesh and the processes."""
  from dualsig_jax import defaults  # light: the config schema

  return defaults.per_process_batch(
    name, global_batch, devices=mesh.devices.size, processes=jax.process_count()
  )


def check_accumulation(global_batch: int, accum_steps: int, mesh: Mesh, name: str) -> None:
  """Refuses an `accum_steps` (config field `name`) that does not split each device's share
  of `global_batch` into equal micro-batches."""
  per_device = global_batch // mesh.devices.size
  if accum_steps > 1 and per_device % accum_steps:
    raise ValueError(
      f'config.{name}={accum_steps} does not split the per-device batch {per_device} '
      f'(input.batch_size={global_batch} over {mesh.devices.size} devices); pick a divisor of '
      f'{per_device}'
    )


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's numpy batch [b, ...] into global arrays [b * processes, ...]."""
  sharding = data_sharded(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }
