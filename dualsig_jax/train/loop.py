"""The training loop of one stage: data, sharded jit step, logging, checkpoints, resume.

Resume takes the newest readable checkpoint (a damaged newer step is set aside with a
warning). SIGTERM / SIGINT stop the loop after its current step with a checkpoint and the grain
workers shut down (see interrupt.py); the stage then raises `interrupt.Interrupted`.
"""

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
from dualsig_jax.train import checkpoints, interrupt, optim, resume, sharding
from dualsig_jax.train import stage as stage_lib
from dualsig_jax.train.state import create_state, train_step

log = logging.getLogger('dualsig_jax')


class _Log:
  """metrics.jsonl writer (process 0 only)."""

  def __init__(self, workdir: str):
    self.on = jax.process_index() == 0
    self.path = os.path.join(workdir, resume.METRICS_FILE)

  def write(self, record: dict) -> None:
    if self.on:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def _close_iterator(it) -> None:
  """Shuts grain's worker processes down now: left to garbage collection they outlive the
  stage, and a killed parent leaves them (and multiprocessing's resource tracker) running."""
  for obj in (it, getattr(it, '_iterator', None)):
    close = getattr(obj, 'close', None)
    if callable(close):
      close()
      return


def _stop_agreed(step: int, every: int) -> bool:
  """Whether to stop after `step`: a signal reached this process (single host), or any
  process (multi-host, agreed every `every` steps so all save the same step together)."""
  if jax.process_count() == 1:
    return interrupt.requested() is not None
  if step % every:
    return False
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.int32(interrupt.requested() or 0))
  signum = int(np.max(flags))
  if signum:
    interrupt.request(signum)
  return signum != 0


def _restore_or_init(config, workdir, stage, model, mgr, data_iter, make_state, meta):
  """(state, start step or None, origin note): the newest readable checkpoint of the stage
  (damaged newer steps are set aside), else the stage's starting weights."""
  if not mgr.all_steps():
    variables, origin = stage_lib.initial_variables(config, workdir, stage, model)
    return make_state(variables), None, origin
  # Resuming: the checkpoint overwrites every leaf, so only the structure is needed here.
  target = make_state(stage_lib.fresh_variables(config, model))

  def read(step):
    return checkpoints.restore(mgr, step, target, data_iter, expected=meta)[0]

  start, state, skipped = checkpoints.restore_newest(mgr, read)
  if skipped:
    checkpoints.set_aside(mgr, skipped)
  return state, start, f'resumed from step {start}'


def train_stage(config: ml_collections.ConfigDict, workdir: str, stage: str) -> dict:
  """Trains one stage ('vanilla' or 'dual'), resuming from the workdir's checkpoint if any.

  Returns:
    {'step': final step, 'checkpoint_dir': path, 'loss': last logged loss}.
  Raises:
    interrupt.Interrupted (exit code 128 + signum) after SIGTERM / SIGINT, once the current
    step is checkpointed. FloatingPointError on a non-finite loss (the last good checkpoint
    is kept). checkpoints.CheckpointCorruptError when no kept checkpoint step is readable.
  """
  defaults.validate(config)
  if stage not in defaults.STAGES:
    raise ValueError(f'unknown stage {stage!r}; valid: {list(defaults.STAGES)}')
  with interrupt.handling():
    return _train_stage(config, workdir, stage)


def _train_stage(config, workdir, stage):
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
  tx, labels, schedules = None, None, None

  def make_state(variables):
    nonlocal tx, labels, schedules
    tx, labels, schedules = optim.make_optimizer(
      variables['params'],
      arch=config.model.arch,
      stage=stage,
      optim_cfg=o,
      steps_per_epoch=spe,
      unfreeze=settings.unfreeze,
      family=config.model.family,
    )
    return create_state(variables, tx, config.seed)

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
  bar = None
  try:
    state, start, origin = _restore_or_init(
      config, workdir, stage, model, mgr, data_iter, make_state, meta
    )
    logger = _Log(workdir)
    if logger.on:
      # Records after the step this stage starts from would otherwise be written twice.
      resume.truncate_metrics(logger.path, stage, start or 0)
    groups = optim.describe_labels(labels)
    repl = sharding.replicated(mesh)
    state = jax.device_put(state, repl)
    step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, **stage_lib.step_kwargs(config, stage)),
      in_shardings=(repl, sharding.data_sharded(mesh)),
      out_shardings=(repl, repl),
      donate_argnums=(0,),
    )

    first = int(state.step)
    if logger.on:
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

    def save(at):
      checkpoints.save(mgr, at, jax.device_get(state), data_iter, meta)

    metrics, saved = None, start
    with interrupt.deferred():
      while step < total:
        if _stop_agreed(step, config.log_every_steps):
          break
        try:
          batch = next(data_iter)  # endless sampler, see make_train_loader above
        except Exception:
          # Ctrl-C in a terminal reaches the grain workers too; one that died of it fails
          # next(). The batches consumed so far are in the iterator's state: save and stop.
          if interrupt.requested() is None or jax.process_count() > 1:
            raise
          break
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
          # The bar shows the lr of a group that trains (fc2 of VGG16 / InceptionV3 is in the
          # classifier group, at lr x lr_classifier_ratio).
          shown = rec['lr_classifier'] if not groups['feature'] else rec['lr']
          bar.set_postfix(
            loss=f'{last_loss:.4f}', lr=f'{shown:.2g}', img_s=f'{rec["images_per_s"]:.0f}'
          )
          t0, t_images = time.perf_counter(), 0
        if step % config.checkpoint.every_steps == 0 or step == total:
          last_loss = check_finite(metrics, step)
          save(step)
          saved = step
      if interrupt.requested() is not None and metrics is not None and saved != step:
        check_finite(metrics, step)
        save(step)
        saved = step
      if metrics is None and start is None and interrupt.requested() is None:
        save(step)
        saved = step
  finally:
    # Deferred: a Ctrl-C raised inside grain's teardown would be printed and swallowed.
    with interrupt.deferred():
      if bar is not None:
        bar.close()
      _close_iterator(data_iter)
  signum = interrupt.requested()
  if signum is not None:
    done = 'finished' if step >= total else 'stopped'
    where = f'step {saved} saved in {ckpt_dir}' if saved is not None else 'no checkpoint yet'
    message = (
      f'stage {stage} {done} at step {step} on {interrupt.signal_name(signum)} ({where}); '
      'run the same command again to resume'
    )
    log.warning('%s', message)
    raise interrupt.Interrupted(signum, message)
  return {'step': step, 'checkpoint_dir': ckpt_dir, 'loss': last_loss}
