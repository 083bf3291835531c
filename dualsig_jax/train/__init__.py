"""Training of both stages: `train_stage(config, workdir, stage)`; pieces in submodules."""
from dualsig_jax.train.loop import (evaluate_accuracy, latest_variables, train_stage,
                                    build_stage_model, checkpoint_dir)
from dualsig_jax.train.state import TrainState, train_step, predict_step

__all__ = ['train_stage', 'evaluate_accuracy', 'latest_variables', 'build_stage_model',
           'checkpoint_dir', 'TrainState', 'train_step', 'predict_step']
