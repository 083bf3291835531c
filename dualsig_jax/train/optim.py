"""Optimizer of both stages: SGD-Nesterov with the reference's name-based parameter groups.

Every parameter gets one label: 'feature' (lr), 'classifier' (lr x lr_classifier_ratio) or
'frozen'. Frozen leaves go through `optax.set_to_zero()`, which keeps no optimizer state for
them; together with the model's `stop_gradient` this states the freezing twice.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from dualsig_jax import models

Labels = Any


def _path_names(path) -> tuple[str, ...]:
  return tuple(getattr(k, 'key', getattr(k, 'name', str(k))) for k in path)


def param_labels(params, *, arch: str, stage: str, unfreeze: str = 'fc2') -> Labels:
  """Labels each parameter leaf 'feature' | 'classifier' | 'frozen'.

  vanilla: everything but `fc2` trains (fc2 has no loss in this stage, so it is frozen).
  dual, unfreeze='fc2': only `fc2` trains (the paper). dual, unfreeze='all': everything trains.
  Trainable leaves take the reference's group for their torch name (`models.lr_group`).
  """

  def label(path, _):
    names = _path_names(path)
    head = names[0]
    if stage == 'vanilla' and head == 'fc2':
      return 'frozen'
    if stage == 'dual' and unfreeze == 'fc2' and head != 'fc2':
      return 'frozen'
    return models.lr_group(arch, names)

  return jax.tree_util.tree_map_with_path(label, params)


def step_decay_schedule(lr: float, *, decay_rate: float, decay_every_steps: int):
  """lr x decay_rate ** floor(step / decay_every_steps) (torch StepLR stepped per epoch)."""
  decay_every_steps = max(int(decay_every_steps), 1)
  return lambda step: lr * decay_rate ** (step // decay_every_steps)


def _sgd(schedule, o: ml_collections.ConfigDict) -> optax.GradientTransformation:
  # torch.optim.SGD adds weight_decay * param to the gradient before momentum; so does this.
  return optax.chain(
    optax.add_decayed_weights(o.weight_decay),
    optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov),
  )


def make_optimizer(
  params,
  *,
  arch: str,
  stage: str,
  optim_cfg: ml_collections.ConfigDict,
  steps_per_epoch: int,
  unfreeze: str = 'fc2',
):
  """Builds the stage's optimizer.

  Returns:
    (tx, labels, schedules): the optax transformation, the label pytree (same structure as
    params) and {'feature': fn, 'classifier': fn} learning-rate schedules for logging.
  """
  o = optim_cfg
  decay_steps = o.lr_decay_frequency * steps_per_epoch
  schedules = {
    'feature': step_decay_schedule(o.lr, decay_rate=o.lr_decay_rate, decay_every_steps=decay_steps),
    'classifier': step_decay_schedule(
      o.lr * o.lr_classifier_ratio, decay_rate=o.lr_decay_rate, decay_every_steps=decay_steps
    ),
  }
  labels = param_labels(params, arch=arch, stage=stage, unfreeze=unfreeze)
  tx = optax.multi_transform(
    {
      'feature': _sgd(schedules['feature'], o),
      'classifier': _sgd(schedules['classifier'], o),
      'frozen': optax.set_to_zero(),
    },
    labels,
  )
  return tx, labels, schedules


def describe_labels(labels) -> dict[str, list[str]]:
  """{'feature': ['conv1/kernel', ...], ...}: which parameters train and at which lr group."""
  out: dict[str, list[str]] = {'feature': [], 'classifier': [], 'frozen': []}
  for path, lab in jax.tree_util.tree_flatten_with_path(labels)[0]:
    out[lab].append('/'.join(_path_names(path)))
  return out
