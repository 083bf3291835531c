"""The whole experiment behind `train.py`: data, every configured stage, then evaluation."""

from __future__ import annotations

import logging

import jax
import ml_collections

from dualsig_jax import data, defaults
from dualsig_jax.train import interrupt, loop, resume, sharding

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


def run(config: ml_collections.ConfigDict, workdir: str, *, evaluate: bool = True) -> dict:
  """Runs `config.stages` in order (each resumes if interrupted), then evaluates the final model.

  A workdir with checkpoints is resumed only with the config saved in it, up to the fields
  of `defaults.RESUME_SAFE_FIELDS` (resume.check_and_write_config). SIGTERM / SIGINT stop the
  run with a checkpoint and raise `interrupt.Interrupted` (a SystemExit with code 128 + signum);
  no later stage or evaluation starts.

  Returns:
    {'stages': {stage: train summary}, 'results': eval results dict or None}.
  """
  sharding.maybe_initialize_distributed()
  defaults.validate(config)
  with interrupt.handling():
    resume.check_and_write_config(config, workdir, write=jax.process_index() == 0)
    if config.input.source == 'folder' and config.input.synthetic.generate:
      data.ensure_synthetic(config.input)
    want_eval = evaluate and 'dual' in config.stages
    check_labels(
      config, [config.input.train_split] + ([config.input.eval_split] if want_eval else [])
    )
    summaries = {}
    for stage in config.stages:
      interrupt.raise_if_requested(f'stopped before stage {stage}')
      summaries[stage] = loop.train_stage(config, workdir, stage)
    results = None
    if want_eval:
      from dualsig_jax import evaluate as evaluate_lib  # needs the CAM and WSOL libraries

      interrupt.raise_if_requested('stopped before evaluation')
      results = evaluate_lib.evaluate(config, workdir)
      interrupt.raise_if_requested('stopped during evaluation')
  return {'stages': summaries, 'results': results}
