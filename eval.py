"""Re-evaluates a trained workdir: python eval.py --config configs/synthetic.py --workdir
runs/synthetic. Logic lives in dualsig_jax.evaluate."""
import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dualsig_jax import evaluate
from dualsig_jax.train import sharding

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a finished train.py run.')
_SPLIT = flags.DEFINE_string('split', None, 'Split to evaluate (default: config.input.eval_split).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  # Orbax and grain log every checkpoint step at INFO; keep the console to our own progress.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('dualsig_jax').setLevel(logging.INFO)
  sharding.maybe_initialize_distributed()
  evaluate.evaluate(_CONFIG.value, _WORKDIR.value, split=_SPLIT.value)


if __name__ == '__main__':
  app.run(main)
