"""Orbax checkpoints of a stage: train state, grain iterator state and a small JSON record.

Layout: `<workdir>/<stage>/checkpoints/<step>/{state,data,meta}`. The JSON record names the
experiment's model (arch, classes, shapes) so a workdir holding another experiment's checkpoint
is refused with a clear message instead of an opaque shape error.
"""

from __future__ import annotations

import os
from typing import Any

import grain.python as grain
import jax
import orbax.checkpoint as ocp


def manager(directory: str, *, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state, data_iter, meta: dict) -> None:
  items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  if data_iter is not None:
    items['data'] = grain.PyGrainCheckpointSave(data_iter)
  mgr.save(step, args=ocp.args.Composite(**items), force=True)
  mgr.wait_until_finished()


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
  return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def check_compatible(meta: dict, expected: dict, where: str) -> None:
  """Raises ValueError when a checkpoint was written by an experiment with another model."""
  for key in ('arch', 'num_classes', 'stage'):
    if key in expected and meta.get(key) != expected[key]:
      raise ValueError(
        f'{where} holds a checkpoint of another experiment: its {key} is {meta.get(key)!r}, '
        f'this config asks for {expected[key]!r}. Use a fresh --workdir or remove it.'
      )


def restore(mgr: ocp.CheckpointManager, step: int, target_state, data_iter=None) -> Any:
  """Restores (state, meta) at `step` into the structure of `target_state`; the data iterator,
  when given, is restored in place."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  items = dict(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
  if data_iter is not None:
    items['data'] = grain.PyGrainCheckpointRestore(data_iter)
  try:
    out = mgr.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f'cannot restore step {step} from {mgr.directory}: the checkpoint does not '
      f"match this experiment's model ({e})"
    ) from e
  return out['state'], out['meta']


def restore_variables(path: str) -> tuple[dict, dict]:
  """{'params', 'batch_stats'} of any checkpoint kind, and what it records of its model.

  `path` is a stage's checkpoint folder (`<workdir>/<stage>/checkpoints`, newest step) or a
  folder written by the converter (`python -m dualsig_jax.convert`). The record (arch, family,
  num_classes, large_feature_map, where known) is {} for checkpoints that predate it.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no checkpoint at {path}')
  mgr = manager(path, max_to_keep=10)
  step = mgr.latest_step()
  if step is None:
    # Weights converted from PyTorch: DIR/variables (+ the converter's record).
    from dualsig_jax import convert

    info_fn = getattr(convert, 'read_checkpoint_info', None)
    info = info_fn(path) if info_fn is not None else {}
    return convert.load_variables(path), dict(info or {})
  restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  try:
    info = read_meta(mgr, step)
  except Exception:  # a checkpoint without the JSON record: nothing to check against
    info = {}
  variables = {'params': restored['params'], 'batch_stats': restored.get('batch_stats', {})}
  return variables, info
