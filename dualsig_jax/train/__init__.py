"""Training of both stages: `train_stage(config, workdir, stage)`; pieces in submodules."""

from dualsig_jax.train.loop import (
  build_stage_model,
  checkpoint_dir,
  evaluate_accuracy,
  latest_variables,
  train_stage,
)
from dualsig_jax.train.state import TrainState, predict_step, train_step

__all__ = [
  'train_stage',
  'evaluate_accuracy',
  'latest_variables',
  'build_stage_model',
  'checkpoint_dir',
  'TrainState',
  'train_step',
  'predict_step',
]
