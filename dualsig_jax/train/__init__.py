"""Training of both stages: `train_stage(config, workdir, stage)`; pieces in submodules.

  stage.py        what a stage trains and where its weights come from
  loop.py         the step loop of one stage (data, sharded jit step, logging, checkpoints)
  state.py        TrainState and the pure train / predict steps
  optim.py        SGD with the reference's parameter groups and lr schedule
  losses.py       softmax CE and class-balanced BCE
  checkpoints.py  every checkpoint format (Orbax stages, converted weights), checksums
  resume.py       what a resume must match (config.json), metrics.jsonl truncation
  interrupt.py    SIGTERM / SIGINT: stop after the current step with a checkpoint
  summary.py      TensorBoard event files (curves, CAM overlays, evaluation metrics)
  sharding.py     mesh, shardings, jax.distributed

Exports resolve lazily, so that importing `dualsig_jax.train.stage` (as evaluation does)
does not import the training loop.
"""

from dualsig_jax import lazy

_EXPORTS = {
  'train_stage': 'loop',
  'build_stage_model': 'stage',
  'checkpoint_dir': 'stage',
  'restore_variables': 'checkpoints',
  'TrainState': 'state',
  'train_step': 'state',
  'predict_step': 'state',
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy.exports(__name__, _EXPORTS)
