"""Optimizer of both stages: SGD-Nesterov with the reference's name-based parameter groups.

The stage's lr is scaled from the batch it was tuned at to the run's global batch
(`lr_scale`), optionally ramped up over `warmup_epochs`, and with `accum_steps` > 1 the
optimizer is wrapped in `optax.MultiSteps` (one update per `accum_steps` micro-batches).

Every parameter gets one label: 'feature' (lr), 'classifier' (lr x lr_classifier_ratio) or
'frozen'. Frozen leaves go through `optax.set_to_zero()`, which keeps no optimizer state for
them; together with the model's `stop_gradient` this states the freezing twice.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dualsig_jax import defaults, models, vocab

Labels = Any


def _path_names(path) -> tuple[str, ...]:
  return tuple(getattr(k, 'key', getattr(k, 'name', str(k))) for k in path)


def param_labels(
  params, *, arch: str | None, stage: str, unfreeze: str = 'fc2', family: str = 'cam'
) -> Labels:
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
    if arch is None or arch not in vocab.ARCHS:
      # A user's model (models.dual_branch): no reference name rules, the lr as given.
      return 'feature'
    return models.lr_group(arch, names, family=family)

  return jax.tree_util.tree_map_with_path(label, params)


def step_decay_schedule(
  lr: float, *, decay_rate: float, frequency: int, steps_per_epoch: int, rule: str = 'reference'
):
  """Per-epoch step decay as a function of the 0-based step; e = step // steps_per_epoch.

  - rule ``'reference'``: lr x rate ** floor((e + 1) / frequency), the reference's
    ``adjust_learning_rate(epoch + 1)`` (x rate at the start of 1-based epoch E whenever
    E % frequency == 0: with frequency 3 the third epoch already runs at lr / 10).
  - rule ``'steplr'``: lr x rate ** floor(e / frequency) (torch StepLR stepped once per epoch).

  Returns:
    an optax schedule: step (int) -> lr (float32 scalar).
  """
  if rule not in ('reference', 'steplr'):
    raise ValueError(f"unknown lr_schedule {rule!r}; valid: ['reference', 'steplr']")
  spe, f = max(int(steps_per_epoch), 1), max(int(frequency), 1)
  shift = 1 if rule == 'reference' else 0
  return lambda step: lr * decay_rate ** ((step // spe + shift) // f)


def lr_scale(rule: str, global_batch: int, base_batch: int) -> float:
  """The factor a stage's lr is multiplied by at `global_batch` (tuned at `base_batch`):
  'linear' B/base, 'sqrt' sqrt(B/base), 'none' 1. Exactly 1.0 when B == base."""
  if rule not in defaults.LR_SCALINGS:
    raise ValueError(f'unknown lr_scaling {rule!r}; valid: {list(defaults.LR_SCALINGS)}')
  if rule == 'none' or global_batch == base_batch:
    return 1.0
  ratio = global_batch / base_batch
  return ratio if rule == 'linear' else ratio**0.5


def _warmup_steps(optim_cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The stage's `warmup_epochs` in optimizer steps (0 when the field is absent)."""
  return round(float(optim_cfg.get('warmup_epochs', 0.0)) * steps_per_epoch)


# The largest batch / base_batch ratio validated on the synthetic benchmark (dual stage, linear
# rule; docs/pods_plan.md "Validation on the synthetic benchmark").
VALIDATED_BATCH_RATIO = 8


def batch_report(
  optim_cfg: ml_collections.ConfigDict,
  stage: str,
  global_batch: int,
  steps_per_epoch: int,
  total: int,
) -> tuple[str, list[str]]:
  """What the run's global batch does to a stage's lr and step count, for the start-of-stage log.

  Args:
    optim_cfg: the stage's config section (lr, base_batch_size, lr_scaling, warmup_epochs).
    stage: ``'vanilla'`` or ``'dual'``.
    global_batch: the run's global batch.
    steps_per_epoch: optimizer steps per epoch at ``global_batch``.
    total: the stage's optimizer steps.

  Returns:
    (info, warnings): one line stating the scaled lr and warmup, and the cases where the run
    is outside what was validated or the lr never reaches its scaled value (empty if none).
  """
  o = optim_cfg
  rule, base = o.get('lr_scaling', 'none'), int(o.get('base_batch_size', global_batch))
  scale = lr_scale(rule, global_batch, base)
  warmup = _warmup_steps(o, steps_per_epoch)
  info = (
    f'stage {stage}: lr {o.lr:g} tuned at batch {base}, x{scale:g} ({rule}) = {o.lr * scale:g} '
    f'at batch {global_batch}; warmup {warmup} of {total} steps'
  )
  warnings = []
  ratio = global_batch / base
  if rule == 'linear' and ratio > VALIDATED_BATCH_RATIO:
    warnings.append(
      f'stage {stage}: batch {global_batch} is {ratio:g}x the batch its lr was tuned at '
      f'({base}); the linear rule was validated up to {VALIDATED_BATCH_RATIO}x only: compare '
      f'with a run at batch {base} before trusting the numbers (docs/pods_plan.md)'
    )
  if rule == 'sqrt' and ratio != 1:
    warnings.append(
      f'stage {stage}: batch {global_batch} is {ratio:g}x the batch its lr was tuned at '
      f"({base}) and the sqrt rule is not validated (the dual stage's linear rule is, up to "
      f'{VALIDATED_BATCH_RATIO}x): compare with a run at batch {base} (docs/pods_plan.md)'
    )
  if stage == 'vanilla' and rule != 'none' and ratio != 1:
    warnings.append(
      f'stage vanilla: batch {global_batch} is {ratio:g}x the tuned {base}, with {total} '
      f'optimizer steps; no lr rule is validated for the vanilla stage (from scratch at 8x on '
      f'the synthetic benchmark, linear, sqrt and linear with the steps kept all lost 17 to 43 '
      f'points of Top-1: docs/pods_plan.md); compare with a run at batch {base}'
    )
  if warmup >= total > 0:
    warnings.append(
      f'stage {stage}: warmup_epochs={o.warmup_epochs:g} is {warmup} steps, not fewer than '
      f"the stage's {total}: the lr never reaches its scaled value {o.lr * scale:g}"
    )
  return info, warnings


def with_warmup(schedule, warmup_steps: int):
  """`schedule` times a linear ramp (step + 1) / warmup_steps over the first `warmup_steps`
  steps (0: `schedule` itself, unchanged)."""
  if warmup_steps <= 0:
    return schedule
  w = int(warmup_steps)

  def warmed(step):
    ramp = (step + 1) / w
    # Python ints when logging, traced int32 steps inside optax.
    factor = min(ramp, 1.0) if isinstance(ramp, float) else jnp.minimum(ramp, 1.0)
    return schedule(step) * factor

  return warmed


def _sgd(schedule, o: ml_collections.ConfigDict) -> optax.GradientTransformation:
  # torch.optim.SGD adds weight_decay * param to the gradient before momentum; so does this.
  return optax.chain(
    optax.add_decayed_weights(o.weight_decay),
    optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov),
  )


def make_optimizer(
  params,
  *,
  arch: str | None,
  stage: str,
  optim_cfg: ml_collections.ConfigDict,
  steps_per_epoch: int,
  unfreeze: str = 'fc2',
  family: str = 'cam',
  global_batch: int | None = None,
):
  """Builds the stage's optimizer.

  Args:
    params: the parameter pytree the optimizer updates.
    arch: the backbone name (its lr rule), or None for a user's model.
    stage: ``'vanilla'`` or ``'dual'``.
    optim_cfg: the stage's config section (lr, schedule, weight decay, batch scaling).
    steps_per_epoch: optimizer steps per epoch (schedules are in epochs).
    unfreeze: what trains in the dual stage.
    family: ``'cam'`` or ``'standard'``.
    global_batch: the run's global batch; the lr is scaled from ``optim_cfg.base_batch_size``
      by ``optim_cfg.lr_scaling`` (None: not scaled). ``optim_cfg.warmup_epochs`` ramps it up
      and ``optim_cfg.accum_steps`` > 1 wraps the optimizer in optax.MultiSteps (fields missing
      from an older section: no scaling, warmup or accumulation).

  Returns:
    (tx, labels, schedules): the optax transformation, the label pytree (same structure as
    params) and {'feature': fn, 'classifier': fn} learning-rate schedules for logging.
  """
  o = optim_cfg
  scale = 1.0
  if global_batch is not None:
    scale = lr_scale(o.get('lr_scaling', 'none'), global_batch, o.get('base_batch_size', 32))
  warmup = _warmup_steps(o, steps_per_epoch)
  # At scale 1.0 the lr is not multiplied at all: a run at the tuned batch is bit-identical.
  lr = o.lr if scale == 1.0 else o.lr * scale
  schedules = {
    group: with_warmup(
      step_decay_schedule(
        group_lr,
        decay_rate=o.lr_decay_rate,
        frequency=o.lr_decay_frequency,
        steps_per_epoch=steps_per_epoch,
        rule=o.lr_schedule,
      ),
      warmup,
    )
    for group, group_lr in (('feature', lr), ('classifier', lr * o.lr_classifier_ratio))
  }
  labels = param_labels(params, arch=arch, stage=stage, unfreeze=unfreeze, family=family)
  tx = optax.multi_transform(
    {
      'feature': _sgd(schedules['feature'], o),
      'classifier': _sgd(schedules['classifier'], o),
      'frozen': optax.set_to_zero(),
    },
    labels,
  )
  if int(o.get('accum_steps', 1)) > 1:
    # Gradients of accum_steps micro-batches are averaged; the inner optimizer (and its
    # schedule count) advances once per step (state.train_step feeds the micro-batches).
    tx = optax.MultiSteps(tx, every_k_schedule=int(o.accum_steps))
  return tx, labels, schedules


def describe_labels(labels) -> dict[str, list[str]]:
  """{'feature': ['conv1/kernel', ...], ...}: which parameters train and at which lr group."""
  out: dict[str, list[str]] = {'feature': [], 'classifier': [], 'frozen': []}
  for path, lab in jax.tree_util.tree_flatten_with_path(labels)[0]:
    out[lab].append('/'.join(_path_names(path)))
  return out
