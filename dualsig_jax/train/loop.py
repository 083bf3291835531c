"""The training loop of one stage: data, sharded jit step, logging, checkpoints, resume."""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from dualsig_jax import data, defaults
from dualsig_jax.train import checkpoints, optim, sharding
from dualsig_jax.train import stage as stage_lib
from dualsig_jax.train.state import create_state, train_step

log = logging.getLogger('dualsig_jax')


class _Log:
  """metrics.jsonl writer (process 0 only)."""

  def __init__(self, workdir: str):
    self.on = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')

  def write(self, record: dict) -> None:
    if self.on:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))


def train_stage(config: ml_collections.ConfigDict, workdir: str, stage: str) -> dict:
  """Trains one stage ('vanilla' or 'dual'), resuming from the workdir's checkpoint if any.

  Returns:
    {'step': final step, 'checkpoint_dir': path, 'loss': last logged loss}.
  """
  defaults.validate(config)
  if stage not in defaults.STAGES:
    raise ValueError(f'unknown stage {stage!r}; valid: {list(defaults.STAGES)}')
  settings = stage_lib.stage_settings(config, stage)
  o = settings.section
  mesh = sharding.make_mesh()
  local_batch = sharding.check_global_batch(config.input.batch_size, mesh)
  model = stage_lib.build_stage_model(config, stage)
  ckpt_dir = stage_lib.checkpoint_dir(workdir, stage)
  spe = data.steps_per_epoch(config.input, config.input.batch_size)
  total = o.max_steps if o.max_steps > 0 else o.num_epochs * spe
  mgr = checkpoints.manager(ckpt_dir, max_to_keep=config.checkpoint.max_to_keep)
  meta = stage_lib.model_record(config, stage)
  start = mgr.latest_step()
  if start is not None:
    checkpoints.check_compatible(checkpoints.read_meta(mgr, start), meta, ckpt_dir)
    # Resuming: the checkpoint overwrites every leaf, so only the structure is needed here.
    variables, origin = stage_lib.fresh_variables(config, model), f'resumed from step {start}'
  else:
    variables, origin = stage_lib.initial_variables(config, workdir, stage, model)
  tx, labels, schedules = optim.make_optimizer(
    variables['params'],
    arch=config.model.arch,
    family=config.model.family,
    stage=stage,
    optim_cfg=o,
    steps_per_epoch=spe,
    unfreeze=settings.unfreeze,
  )
  groups = optim.describe_labels(labels)
  state = create_state(variables, tx, config.seed)

  loader = data.make_train_loader(
    config.input,
    seed=config.seed + (stage == 'dual'),
    # Endless sampler (the loop counts steps): its repr, which grain
    # checks on restore, must not depend on max_steps / num_epochs.
    num_epochs=None,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    batch_size=local_batch,
  )
  data_iter = iter(loader)
  if start is not None:
    state, _ = checkpoints.restore(mgr, start, state, data_iter)

  repl = sharding.replicated(mesh)
  state = jax.device_put(state, repl)
  loss_kwargs = dict(
    stage=stage,
    train_mode=settings.train_mode,
    keep_batch_stats=settings.keep_batch_stats,
    pos_weight=(
      config.model.num_classes - 1.0
      if config.dual.pos_weight < 0
      else float(config.dual.pos_weight)
    ),
    gamma=config.dual.gamma,
    temp=config.dual.temp,
  )
  step_fn = jax.jit(
    functools.partial(train_step, model=model, tx=tx, **loss_kwargs),
    in_shardings=(repl, sharding.data_sharded(mesh)),
    out_shardings=(repl, repl),
    donate_argnums=(0,),
  )

  logger = _Log(workdir)
  first = int(state.step)
  if jax.process_index() == 0:
    n_train = sum(len(v) for k, v in groups.items() if k != 'frozen')
    log.info(
      'stage %s: %s; %d steps (%d per epoch), batch %d on %d devices',
      stage,
      origin,
      total,
      spe,
      config.input.batch_size,
      mesh.devices.size,
    )
    log.info(
      'stage %s trains %d parameter arrays (feature lr group: %s; classifier lr x%g: %s)'
      '; %d frozen',
      stage,
      n_train,
      groups['feature'],
      o.lr_classifier_ratio,
      groups['classifier'],
      len(groups['frozen']),
    )
    logger.write(
      dict(
        stage=stage,
        step=first,
        event='start',
        origin=origin,
        trainable=groups['feature'] + groups['classifier'],
        lr_groups={k: v for k, v in groups.items() if k != 'frozen'},
      )
    )

  bar = tqdm(
    total=total,
    initial=first,
    desc=f'{stage}',
    disable=jax.process_index() != 0,
    dynamic_ncols=True,
  )
  last_loss, t0, t_images = float('nan'), time.perf_counter(), 0
  step = first

  def check_finite(metrics, at):
    v = float(metrics['loss'])
    if not np.isfinite(v):
      raise FloatingPointError(
        f'stage {stage}: loss became {v} at step {at}; stopping. The last good checkpoint '
        f'(step {mgr.latest_step()}) is kept in {ckpt_dir}'
      )
    return v

  metrics = None
  while step < total:
    batch = next(data_iter)  # endless sampler, see make_train_loader above
    gbatch = sharding.to_global({'image': batch['image'], 'label': batch['label']}, mesh)
    state, metrics = step_fn(state, gbatch)
    step += 1
    t_images += config.input.batch_size
    bar.update(1)
    if step % config.log_every_steps == 0 or step == total:
      last_loss = check_finite(metrics, step)
      dt = time.perf_counter() - t0
      rec = {k: float(v) for k, v in metrics.items()}
      rec.update(
        stage=stage,
        step=step,
        lr=float(schedules['feature'](step - 1)),
        lr_classifier=float(schedules['classifier'](step - 1)),
        images_per_s=t_images / max(dt, 1e-9),
      )
      logger.write(rec)
      bar.set_postfix(
        loss=f'{last_loss:.4f}', lr=f'{rec["lr"]:.2g}', img_s=f'{rec["images_per_s"]:.0f}'
      )
      t0, t_images = time.perf_counter(), 0
    if step % config.checkpoint.every_steps == 0 or step == total:
      last_loss = check_finite(metrics, step)
      checkpoints.save(mgr, step, jax.device_get(state), data_iter, meta)
  bar.close()
  if metrics is None and start is None:
    checkpoints.save(mgr, step, jax.device_get(state), data_iter, meta)
  return {'step': step, 'checkpoint_dir': ckpt_dir, 'loss': last_loss}
