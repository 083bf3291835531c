"""The training loop of one stage: data, sharded jit step, logging, checkpoints, resume.

Resume takes the newest readable checkpoint (a damaged newer step is set aside with a
warning). SIGTERM / SIGINT stop the loop after its current step with a checkpoint and the grain
workers shut down (see interrupt.py); the stage then raises `interrupt.Interrupted`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from dualsig_jax import data, defaults
from dualsig_jax.train import checkpoints, interrupt, optim, resume, sharding, speed, summary
from dualsig_jax.train import stage as stage_lib
from dualsig_jax.train.state import create_state, train_step

log = logging.getLogger('dualsig_jax')


class _Log:
  """metrics.jsonl writer (process 0 only), and TensorBoard's when `tb` is set."""

  def __init__(self, workdir: str):
    self.on = jax.process_index() == 0
    self.path = os.path.join(workdir, resume.METRICS_FILE)
    self.tb: summary.StageSummary | None = None

  def write(self, record: dict) -> None:
    if self.on:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    if self.tb is not None:
      self.tb.record(record)


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


def _restore_or_init(config, workdir, st, data_iter):
  """(state, start step or None, origin note): the newest readable checkpoint of the stage
  (damaged newer steps are set aside; `data_iter` continues from its batch), else the
  stage's starting weights."""
  if not st.mgr.all_steps():
    variables, origin = stage_lib.initial_variables(config, workdir, st.name, st.model)
    return st.make_state(variables), None, origin
  # Resuming: the checkpoint overwrites every leaf, so only the structure is needed here.
  target = st.make_state(stage_lib.fresh_variables(config, st.model))

  def read(step):
    return checkpoints.restore(st.mgr, step, target, data_iter, expected=st.meta)

  start, (state, meta), skipped = checkpoints.restore_newest(st.mgr, read)
  if skipped:
    checkpoints.set_aside(st.mgr, skipped)
  _say_if_devices_changed(st, meta, start)
  return state, start, f'resumed from step {start}'


def _say_if_devices_changed(st, meta: dict, step: int) -> None:
  """A resume on another device or process count is allowed (the global batch and the data
  order stay the same) but drifts in the last bits: the log says so."""
  then = (meta.get('devices'), meta.get('processes'))
  now = (jax.device_count(), jax.process_count())
  if then[0] is None or then == now or jax.process_index() != 0:
    return
  log.warning(
    'stage %s: step %d was saved on %d devices (%s processes), this run has %d devices (%d '
    'processes): the resume continues with the same global batch and data order, but the '
    'batch is split differently, so the results drift from an uninterrupted run in the last '
    'bits (as documented)',
    st.name,
    step,
    then[0],
    then[1],
    *now,
  )


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


@dataclasses.dataclass
class _Stage:
  """What one stage's run is made of (built by `_set_up`)."""

  name: str
  workdir: str
  config: ml_collections.ConfigDict
  section: ml_collections.ConfigDict  # config.vanilla or config.dual
  unfreeze: str
  mesh: jax.sharding.Mesh
  model: object
  ckpt_dir: str
  mgr: object  # orbax CheckpointManager
  meta: dict  # the model record saved with every checkpoint
  steps_per_epoch: int
  total: int  # the step the stage ends at
  local_batch: int
  tx: object = None  # set by make_state, with labels and schedules
  labels: object = None
  schedules: dict | None = None

  def make_state(self, variables):
    """A TrainState of `variables` (and this stage's optimizer, built here)."""
    self.tx, self.labels, self.schedules = optim.make_optimizer(
      variables['params'],
      arch=self.config.model.arch,
      stage=self.name,
      optim_cfg=self.section,
      steps_per_epoch=self.steps_per_epoch,
      unfreeze=self.unfreeze,
      family=self.config.model.family,
      global_batch=self.config.input.batch_size,
    )
    return create_state(variables, self.tx, self.config.seed)


def _set_up(config, workdir, stage) -> _Stage:
  """Mesh, model, checkpoint manager and step counts of `stage` (nothing trained yet)."""
  settings = stage_lib.stage_settings(config, stage)
  o = settings.section
  mesh = sharding.make_mesh()
  local_batch = sharding.check_global_batch(config.input.batch_size, mesh)
  sharding.check_accumulation(config.input.batch_size, o.accum_steps, mesh, f'{stage}.accum_steps')
  spe = data.steps_per_epoch(config.input, config.input.batch_size)
  ckpt_dir = stage_lib.checkpoint_dir(workdir, stage)
  meta = stage_lib.model_record(config, stage)
  meta.update(devices=jax.device_count(), processes=jax.process_count())  # (a resume compares)
  if stage == 'dual':  # its origin, should dual/source.json be lost (stage.dual_source_change)
    meta['source'] = stage_lib.source_identity_now(config, workdir)
  return _Stage(
    name=stage,
    workdir=workdir,
    config=config,
    section=o,
    unfreeze=settings.unfreeze,
    mesh=mesh,
    model=stage_lib.build_stage_model(config, stage),
    ckpt_dir=ckpt_dir,
    mgr=checkpoints.manager(
      ckpt_dir,
      max_to_keep=config.checkpoint.max_to_keep,
      async_save=config.checkpoint.async_save,
      writer=True,
    ),
    meta=meta,
    steps_per_epoch=spe,
    total=stage_lib.total_steps(config, stage, spe),
    local_batch=local_batch,
  )


def _open_data(config, st: _Stage):
  """This process's endless train iterator (global batches of the stage's seed)."""
  loader = data.make_train_loader(
    config.input,
    seed=config.seed + (st.name == 'dual'),
    # Endless (the loop counts steps), so the saved position does not depend on max_steps /
    # num_epochs.
    num_epochs=None,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    batch_size=st.local_batch,
  )
  return iter(loader)


def jit_train_step(config, stage: str, model, tx, mesh):
  """The stage's jitted, sharded train step: (state, global batch) -> (state, metrics);
  state replicated (donated), batch split over the mesh's 'data' axis. Also what
  `dualsig_jax.plan` compiles for a TPU slice."""
  repl = sharding.replicated(mesh)
  return jax.jit(
    functools.partial(
      train_step,
      model=model,
      tx=tx,
      accum_steps=int(config[stage].accum_steps),
      **stage_lib.step_kwargs(config, stage),
    ),
    in_shardings=(repl, sharding.data_sharded(mesh)),
    out_shardings=(repl, repl),
    donate_argnums=(0,),
  )


def _compile_step(config, st: _Stage):
  return jit_train_step(config, st.name, st.model, st.tx, st.mesh)


def _log_start(config, st: _Stage, logger: _Log, origin: str, first: int) -> dict:
  """Logs the stage's plan and trainable groups; returns the groups (name -> arrays)."""
  groups = optim.describe_labels(st.labels)
  if not logger.on:
    return groups
  n_train = sum(len(v) for k, v in groups.items() if k != 'frozen')
  log.info(
    'stage %s: %s; %d steps (%d per epoch), batch %d on %d devices',
    st.name,
    origin,
    st.total,
    st.steps_per_epoch,
    config.input.batch_size,
    st.mesh.devices.size,
  )
  info, warnings = optim.batch_report(
    st.section, st.name, int(config.input.batch_size), st.steps_per_epoch, st.total
  )
  log.info('%s', info)
  for w in warnings:
    log.warning('%s', w)
  log.info(
    'stage %s trains %d parameter arrays (feature lr group: %s; classifier lr x%g: %s); %d frozen',
    st.name,
    n_train,
    groups['feature'],
    st.section.lr_classifier_ratio,
    groups['classifier'],
    len(groups['frozen']),
  )
  logger.write(
    dict(
      stage=st.name,
      step=first,
      event='start',
      origin=origin,
      trainable=groups['feature'] + groups['classifier'],
      lr_groups={k: v for k, v in groups.items() if k != 'frozen'},
    )
  )
  return groups


def _finite_loss(st: _Stage, metrics, at: int) -> float:
  """The step's loss; FloatingPointError (naming the kept checkpoint) when it is not finite."""
  v = float(metrics['loss'])
  if not np.isfinite(v):
    raise FloatingPointError(
      f'stage {st.name}: loss became {v} at step {at}; stopping. The last good checkpoint '
      f'(step {st.mgr.latest_step()}) is kept in {st.ckpt_dir}'
    )
  return v


class _Progress:
  """metrics.jsonl records and the progress bar, every `log_every_steps` steps."""

  def __init__(self, st: _Stage, logger: _Log, groups: dict, first: int):
    self.st, self.logger, self.groups = st, logger, groups
    self.bar = tqdm(
      total=st.total,
      initial=first,
      desc=st.name,
      disable=jax.process_index() != 0,
      dynamic_ncols=True,
    )
    self.speed = speed.Speed(st.config.input.batch_size, list(st.mesh.devices.flat))

  def step(self) -> None:
    self.speed.step()
    self.bar.update(1)

  def compiled(self, step: int) -> None:
    """Logs the first step's compile, once per stage (kept out of the speed fields)."""
    rec = dict(stage=self.st.name, step=step, **self.speed.compile_record())
    self.logger.write(rec)
    if self.logger.on:
      log.info('stage %s: step compiled in %.1f s', self.st.name, rec['compile_s'])

  def write(self, step: int, metrics, loss: float) -> None:
    """The log step's record (metrics.jsonl and the console), built here only: the step's
    metrics, learning rates and the speed since the previous log step."""
    sched = self.st.schedules
    rec = {k: float(v) for k, v in metrics.items()}
    rec.update(
      stage=self.st.name,
      step=step,
      lr=float(sched['feature'](step - 1)),
      lr_classifier=float(sched['classifier'](step - 1)),
      **self.speed.fields(),
    )
    self.logger.write(rec)
    # The bar shows the lr of a group that trains (fc2 of VGG16 / InceptionV3 is in the
    # classifier group, at lr x lr_classifier_ratio).
    shown = rec['lr_classifier'] if not self.groups['feature'] else rec['lr']
    post = dict(
      loss=f'{loss:.4f}',
      lr=f'{shown:.2g}',
      img_s=f'{rec["images_per_s"]:.0f}',
      img_s_dev=f'{rec["images_per_s_per_device"]:.0f}',
      step_s=f'{rec["step_time_s"]:.3f}',
    )
    if 'mfu' in rec:
      post['mfu'] = f'{rec["mfu"]:.1%}'
    self.bar.set_postfix(**post)

  def close(self) -> None:
    self.bar.close()


def _next_batch(data_iter):
  """The next local batch, or None when a stop was requested and the read failed.

  Ctrl-C in a terminal reaches the grain workers too; one that died of it fails next(). The
  batches consumed so far are in the iterator's state: the caller saves and stops.
  """
  try:
    return next(data_iter)  # endless, see _open_data
  except Exception:
    if interrupt.requested() is None or jax.process_count() > 1:
      raise
    return None


def _run_steps(config, st: _Stage, state, data_iter, progress: _Progress, start):
  """Steps from `state.step` to `st.total` (or a stop signal), logging and checkpointing.

  Returns (step reached, last logged loss, last saved step or None).
  """
  step_fn = _compile_step(config, st)
  step, saved, metrics, last_loss = int(state.step), start, None, float('nan')
  profile = speed.Profile(config, st.workdir, st.name)

  def save(at):
    checkpoints.save(st.mgr, at, jax.device_get(state), data_iter, st.meta)
    return at

  with interrupt.deferred():
    while step < st.total and not _stop_agreed(step, config.log_every_steps):
      batch = _next_batch(data_iter)
      if batch is None:
        break
      gbatch = sharding.to_global({'image': batch['image'], 'label': batch['label']}, st.mesh)
      if metrics is None:
        step_fn = progress.speed.compile(step_fn, state, gbatch)
        progress.compiled(step + 1)
      profile.before(step + 1)
      # Between two log or save steps nothing reads the device (see speed.py).
      with speed.between_logs(step + 1, st.total, config):
        state, metrics = step_fn(state, gbatch)
        step += 1
        progress.step()
      profile.after(step, metrics)
      if step % config.log_every_steps == 0 or step == st.total:
        last_loss = _finite_loss(st, metrics, step)
        progress.write(step, metrics, last_loss)
      if step % config.checkpoint.every_steps == 0 or step == st.total:
        last_loss = _finite_loss(st, metrics, step)
        saved = save(step)
      if progress.logger.tb is not None and (step % st.steps_per_epoch == 0 or step == st.total):
        progress.logger.tb.epoch_end(step, -(-step // st.steps_per_epoch), state.variables())
    profile.stop()
    stopped = interrupt.requested() is not None
    if stopped and metrics is not None and saved != step:
      _finite_loss(st, metrics, step)
      saved = save(step)
    if metrics is None and start is None and not stopped:
      saved = save(step)  # a stage with nothing to train still records its starting point
  return step, last_loss, saved


def _train_stage(config, workdir, stage):
  st = _set_up(config, workdir, stage)
  data_iter = _open_data(config, st)
  progress = None
  try:
    state, start, origin = _restore_or_init(config, workdir, st, data_iter)
    logger = _Log(workdir)
    if logger.on:
      # Records after the step this stage starts from would otherwise be written twice.
      resume.truncate_metrics(logger.path, stage, start or 0)
    if summary.enabled(config):  # drops its own events after `start` too
      logger.tb = summary.StageSummary(config, workdir, stage, st.model, start or 0)
    groups = _log_start(config, st, logger, origin, int(state.step))
    state = jax.device_put(state, sharding.replicated(st.mesh))
    progress = _Progress(st, logger, groups, int(state.step))
    step, last_loss, saved = _run_steps(config, st, state, data_iter, progress, start)
  finally:
    # Deferred: a Ctrl-C raised inside grain's teardown would be printed and swallowed.
    with interrupt.deferred():
      try:
        # An asynchronous save still in flight completes (with its manifest) on every exit
        # path; an error there (a full disk) still closes the bar, so the error is one line.
        checkpoints.finish(st.mgr)
      finally:
        if progress is not None:
          progress.close()
          if progress.logger.tb is not None:
            progress.logger.tb.close()
        data_iter.close()  # the workers stop now, not at garbage collection
  _raise_if_stopped(st, step, saved)
  return {'step': step, 'checkpoint_dir': st.ckpt_dir, 'loss': last_loss}


def _raise_if_stopped(st: _Stage, step: int, saved) -> None:
  """Raises interrupt.Interrupted, saying where the run stopped, after a signal."""
  signum = interrupt.requested()
  if signum is None:
    return
  done = 'finished' if step >= st.total else 'stopped'
  where = f'step {saved} saved in {st.ckpt_dir}' if saved is not None else 'no checkpoint yet'
  message = (
    f'stage {st.name} {done} at step {step} on {interrupt.signal_name(signum)} ({where}); '
    'run the same command again to resume'
  )
  log.warning('%s', message)
  raise interrupt.Interrupted(signum, message)
