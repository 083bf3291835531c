"""Trains the configured stages and evaluates: python train.py --config configs/synthetic.py
--workdir runs/synthetic (see README). Logic lives in dualsig_jax.experiment."""
import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dualsig_jax import experiment

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (checkpoints, logs, results).')
_NO_EVAL = flags.DEFINE_bool('skip_eval', False, 'Train only; run eval.py later.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  # Orbax and grain log every checkpoint step at INFO; keep the console to our own progress.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('dualsig_jax').setLevel(logging.INFO)
  experiment.run(_CONFIG.value, _WORKDIR.value, evaluate=not _NO_EVAL.value)


if __name__ == '__main__':
  app.run(main)
