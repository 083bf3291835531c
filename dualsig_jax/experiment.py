"""The whole experiment behind `train.py`: data, every configured stage, then evaluation."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys

import jax
import ml_collections

from dualsig_jax import data, defaults
from dualsig_jax import workdir as workdir_lib
from dualsig_jax.train import interrupt, loop, resume, sharding
from dualsig_jax.train import stage as stage_lib

log = logging.getLogger('dualsig_jax')


def setup_logging() -> None:
  """Console logging of the entry points: our INFO lines and progress bars, not Orbax's and
  grain's per-checkpoint INFO chatter."""
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  log.setLevel(logging.INFO)


def check_labels(config: ml_collections.ConfigDict, splits) -> bool:
  """Refuses labels outside [0, model.num_classes) before any step runs (they make the loss
  NaN a step later); uses `data.check_labels` on the folder-source metadata of `splits`.

  Returns False when it checked nothing (a TFDS source, whose loaders check their declared
  class count themselves)."""
  fn = data.check_labels
  if config.input.source != 'folder':
    return False
  from dualsig_jax.data import loaders

  for split in dict.fromkeys(splits):
    fn(loaders.load_split(config.input, split), config.model.num_classes)
  return True


# The errors of a run that are the user's to fix (train.py prints them in one line, exit 2).
USER_ERRORS = (resume.ConfigChangedError, workdir_lib.WorkdirBusyError, defaults.BatchSplitError)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _os_error(e: BaseException) -> OSError | None:
  """The disk-full / not-writable OSError behind `e` (Orbax and TensorStore wrap it), or None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DISK_FULL + _NOT_WRITABLE:
      return e
    if 'No space left on device' in str(e):
      return OSError(errno.ENOSPC, 'No space left on device')
    e = e.__cause__ or e.__context__
  return None


def user_error_line(e: BaseException, workdir: str = '') -> str | None:
  """One line naming the cause and the remedy of an error that is the user's to fix (a
  refused config, a busy or read-only workdir, a full disk, labels or images that do not fit,
  a refused regeneration), or None for anything else (a bug: its traceback is the report)."""
  from dualsig_jax.data import metadata, transforms
  from dualsig_jax.train import checkpoints

  os_error = _os_error(e)
  if os_error is not None and os_error.errno in _DISK_FULL:
    return (
      f'the disk is full ({os_error.strerror}) while writing {_written(os_error, workdir)}; '
      'every complete checkpoint and result written before is kept: free some space and run '
      'the same command again (a run resumes from its last complete checkpoint)'
    )
  if os_error is not None:
    return (
      f'cannot write {_written(os_error, workdir)} ({os_error.strerror}); make it writable or '
      'pass another --workdir, then run the same command again'
    )
  if isinstance(e, FileExistsError):  # the synthetic set generator refusing a foreign folder
    return str(e)
  bad_image = _in_chain(e, transforms.BadImageError)
  if bad_image is not None:  # (a loader worker's error may arrive wrapped)
    return f'{bad_image} Restore the file, or remove its line from the metadata.'
  if isinstance(e, (*USER_ERRORS, metadata.MetadataError, checkpoints.CheckpointCorruptError)):
    return str(e)
  return None


def _in_chain(e: BaseException, kind) -> BaseException | None:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, kind):
      return e
    e = e.__cause__ or e.__context__
  return None


def _written(e: OSError, workdir: str) -> str:
  return e.filename if getattr(e, 'filename', None) else (workdir or 'the output')


@contextlib.contextmanager
def one_line_errors(workdir: str = ''):
  """For the entry points: an error that is the user's to fix (`user_error_line`) is printed
  as one line on stderr and exits 2; any other error propagates with its traceback."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 (classified by user_error_line; others re-raised)
    line = user_error_line(e, workdir)
    if line is None:
      raise
    print(f'error: {" ".join(line.split())}', file=sys.stderr)
    sys.exit(2)


EVALUATED_FILE = 'evaluated.json'  # what results.json was computed from (finished-run check)
# Fields that do not change what an evaluation computes.
_NOT_EVALUATED = (
  'eval.force',
  'log_every_steps',
  'checkpoint.every_steps',
  'checkpoint.max_to_keep',
)


def _evaluated_state(config, workdir: str) -> dict:
  """The config and each stage's newest checkpoint step (and its contents' digest) that an
  evaluation of `workdir` now would read."""
  from dualsig_jax.train import checkpoints

  values = resume.config_values(config)
  stages = {}
  for stage in defaults.STAGES:
    numbered = workdir_lib.steps(workdir, stage)
    if numbered:
      step_dir = os.path.join(workdir_lib.checkpoint_dir(workdir, stage), str(numbered[-1]))
      stages[stage] = {'step': numbered[-1], 'digest': checkpoints.manifest_digest(step_dir)}
  return {
    'config': {k: v for k, v in values.items() if k not in _NOT_EVALUATED},
    'checkpoints': stages,
  }


def saved_results(config, workdir: str) -> dict | None:
  """results.json of `workdir` when it was computed from this config and the current newest
  checkpoints (recorded in evaluated.json), else None.

  results.json must also record the evaluation settings this config asks for (split,
  methods, thresholds, model: `report.evaluation_settings`) and the newest dual step: an
  evaluation with other settings, or one an earlier version let eval.py write over the run's
  own, is never presented as this run's."""
  from dualsig_jax import report  # the plotting libraries: only when results are reused

  try:
    with open(os.path.join(workdir, EVALUATED_FILE), encoding='utf-8') as f:
      record = json.load(f)
    with open(os.path.join(workdir, 'results.json'), encoding='utf-8') as f:
      results = json.load(f)
  except (OSError, ValueError):
    return None
  # Through JSON, so tuples compare as the lists the record holds.
  now = json.loads(json.dumps(_evaluated_state(config, workdir)))
  if record != now or not isinstance(results, dict):
    return None
  if results.get('settings') != report.evaluation_settings(config, config.input.eval_split):
    return None
  dual = now['checkpoints'].get('dual', {}).get('step')
  evaluated = (results.get('checkpoints') or {}).get('dual') or {}
  return results if dual is not None and evaluated.get('step') == dual else None


def _write_evaluated(config, workdir: str) -> None:
  path = os.path.join(workdir, EVALUATED_FILE)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(_evaluated_state(config, workdir), f, indent=1)
  os.replace(path + '.tmp', path)


def _show_saved(workdir: str) -> None:
  md = os.path.join(workdir, 'results.md')
  if os.path.isfile(md):
    with open(md, encoding='utf-8') as f:
      print(f.read().rstrip())
  log.info(
    '%s is finished: every stage is trained and results.json was computed from these '
    'checkpoints and this config, so it is not evaluated again (its results are above, in '
    '%s). To evaluate again, add --config.eval.force=True',
    workdir,
    md,
  )


def _finished_stages(config, workdir: str) -> dict | None:
  """{stage: {'step', 'checkpoint_dir', 'loss': None}} when every stage of `config.stages` is
  at its last step, its newest step verifies against its manifest and the dual stage's input
  is unchanged (nothing to train); else None (the stages run, resuming as usual)."""
  from dualsig_jax.train import checkpoints

  progress = stage_lib.stage_progress(config, workdir)
  out = {}
  for stage, p in progress.items():
    if not p['finished'] or p.get('source_change'):
      return None
    step_dir = os.path.join(workdir_lib.checkpoint_dir(workdir, stage), str(p['step']))
    try:
      if not checkpoints.verify_manifest(step_dir):
        return None
    except checkpoints.CheckpointCorruptError:
      return None  # the loop sets the damaged step aside and trains it again
    out[stage] = {'step': p['step'], 'checkpoint_dir': os.path.dirname(step_dir), 'loss': None}
  return out


def refuse_shorter_than_trained(config, workdir: str) -> None:
  """Refuses a config that ends a stage before the step its checkpoints already reached
  (fewer num_epochs or max_steps on a finished run): checkpoints are never cut back, so the
  run would report the longer training under a config.json that says the shorter one.

  Raises:
    resume.ConfigChangedError naming the stage, its trained step, the config's end step and
    the saved values that fit.
  """
  steps = {s: workdir_lib.steps(workdir, s) for s in defaults.STAGES}
  trained = {s: numbered[-1] for s, numbered in steps.items() if numbered}
  if not trained:
    return
  spe = data.steps_per_epoch(config.input, config.input.batch_size)
  saved = resume.saved_values(workdir) or {}
  for stage, step in trained.items():
    end = stage_lib.total_steps(config, stage, spe)
    if step <= end:
      continue
    sec = config[stage]
    now = (
      f'{stage}.max_steps={sec.max_steps}'
      if sec.max_steps > 0
      else (f'{stage}.num_epochs={sec.num_epochs} ({spe} steps per epoch)')
    )
    keep = ', '.join(
      f'--config.{k}={saved[k]}'
      for k in (f'{stage}.num_epochs', f'{stage}.max_steps')
      if k in saved
    )
    raise resume.ConfigChangedError(
      f'the {stage} stage of {workdir} has trained to step {step}, but this config ends it at '
      f'step {end} ({now}); checkpoints are never cut back, so nothing would be trained and '
      f'config.json would contradict them. Keep the saved values ({keep or "see config.json"}) '
      'or more, or use a fresh --workdir (eval.py evaluates without training)'
    )


def _retrain_dual_if_its_input_changed(config, workdir: str) -> None:
  """A dual stage trained from a vanilla checkpoint that has since changed is trained again."""
  reason = stage_lib.dual_source_change(config, workdir)
  if reason is None:
    return
  if jax.process_index() == 0:
    stage_lib.retire_dual_stage(workdir, reason)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices('retire_dual_stage')


def run(config: ml_collections.ConfigDict, workdir: str, *, evaluate: bool = True) -> dict:
  """Runs `config.stages` in order (each resumes if interrupted), then evaluates the final model.

  A workdir with checkpoints is resumed only with the config saved in it, up to the fields
  of `defaults.RESUME_SAFE_FIELDS` (resume.check_and_write_config). One run at a time: process
  0 holds the workdir's lock (`workdir.locked`) for the whole run. A dual stage whose vanilla
  checkpoint changed since it trained, or whose origin cannot be established, is trained again
  (`stage.dual_source_change`). A config that ends a stage before its checkpoints' step is
  refused (`refuse_shorter_than_trained`). A finished run (every stage at its last, verified
  step; results.json computed from those checkpoints with this config's evaluation settings)
  restores no stage and is not evaluated again unless `eval.force` (single-process runs): it
  says so first and prints its saved results.
  SIGTERM / SIGINT stop the run with a checkpoint and raise `interrupt.Interrupted` (a
  SystemExit with code 128 + signum); no later stage or evaluation starts.

  Returns:
    {'stages': {stage: train summary}, 'results': eval results dict or None,
     'reused': True when the saved results were returned without evaluating}.
  Raises:
    one of USER_ERRORS (a changed or shortened config, another run holding the workdir, batch
    sizes that do not split over the devices) before any step runs (all but the shortened
    config before any data is generated). The entry points print these, and the other errors
    that are the user's to fix (`user_error_line`), in one line.
  """
  sharding.maybe_initialize_distributed()
  defaults.validate(config)
  defaults.check_batch_split(config, devices=jax.device_count(), processes=jax.process_count())
  lock = workdir_lib.locked(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock, interrupt.handling():
    if jax.process_index() == 0:
      workdir_lib.remove_stale_temporaries(workdir, defaults.STAGES)
    resume.check_and_write_config(config, workdir, write=False)  # before any data is made
    if config.input.source == 'folder' and config.input.synthetic.generate:
      data.ensure_synthetic(config.input)
    refuse_shorter_than_trained(config, workdir)
    resume.check_and_write_config(config, workdir, write=jax.process_index() == 0)
    want_eval = evaluate and 'dual' in config.stages
    check_labels(
      config, [config.input.train_split] + ([config.input.eval_split] if want_eval else [])
    )
    # One process only: every process must take the same branch, and each reads its own view
    # of the workdir (a multi-host run trains and evaluates again rather than risk a split).
    single = jax.process_count() == 1
    summaries = _finished_stages(config, workdir) if single else None
    results, reused = None, False
    if summaries is not None and want_eval and not config.eval.force:
      results = saved_results(config, workdir)
      reused = results is not None
    if summaries is not None and (reused or not want_eval):
      # Said first, with no stage restored and no loader built: there is nothing to do.
      if reused:
        _show_saved(workdir)
      else:
        log.info('%s is finished: every stage of %s is trained', workdir, list(config.stages))
      return {'stages': summaries, 'results': results, 'reused': reused}
    summaries = {}
    for stage in config.stages:
      interrupt.raise_if_requested(f'stopped before stage {stage}')
      if stage == 'dual':
        _retrain_dual_if_its_input_changed(config, workdir)
      summaries[stage] = loop.train_stage(config, workdir, stage)
    if want_eval and not config.eval.force and single:
      results = saved_results(config, workdir)
      reused = results is not None
      if reused and jax.process_index() == 0:
        _show_saved(workdir)
    if want_eval and not reused:
      from dualsig_jax import evaluate as evaluate_lib  # needs the CAM and WSOL libraries

      interrupt.raise_if_requested('stopped before evaluation')
      results = evaluate_lib.evaluate(config, workdir)
      interrupt.raise_if_requested('stopped during evaluation')
      if jax.process_index() == 0:
        _write_evaluated(config, workdir)
  return {'stages': summaries, 'results': results, 'reused': reused}
