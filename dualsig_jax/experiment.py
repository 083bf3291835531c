"""The whole experiment behind `train.py`: data, every configured stage, then evaluation."""

from __future__ import annotations

import logging
import os

import ml_collections

from dualsig_jax import data, defaults
from dualsig_jax.train import loop, sharding

log = logging.getLogger('dualsig_jax')


def setup_logging() -> None:
  """Console logging of the entry points: our INFO lines and progress bars, not Orbax's and
  grain's per-checkpoint INFO chatter."""
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  log.setLevel(logging.INFO)


def run(config: ml_collections.ConfigDict, workdir: str, *, evaluate: bool = True) -> dict:
  """Runs `config.stages` in order (each resumes if interrupted), then evaluates the final model.

  Returns:
    {'stages': {stage: train summary}, 'results': eval results dict or None}.
  """
  sharding.maybe_initialize_distributed()
  defaults.validate(config)
  os.makedirs(workdir, exist_ok=True)
  loop.write_config(config, workdir)
  if config.input.source == 'folder' and config.input.synthetic.generate:
    data.ensure_synthetic(config.input)
  summaries = {}
  for stage in config.stages:
    summaries[stage] = loop.train_stage(config, workdir, stage)
  results = None
  if evaluate and 'dual' in config.stages:
    from dualsig_jax import evaluate as evaluate_lib  # needs the CAM and WSOL libraries

    results = evaluate_lib.evaluate(config, workdir)
  return {'stages': summaries, 'results': results}
