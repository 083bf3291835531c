"""Trains the configured stages and evaluates: python train.py --config configs/synthetic.py
--workdir runs/synthetic (see README). Logic lives in dualsig_jax.experiment."""

from absl import app, flags
from ml_collections import config_flags

from dualsig_jax import entry

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file (configs/*.py[:arg]).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (checkpoints, logs, results).')
_NO_EVAL = flags.DEFINE_bool('skip_eval', False, 'Train only; run eval.py later.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  entry.check_config_or_exit(_CONFIG.value, _WORKDIR.value)
  from dualsig_jax import experiment  # after the preflight: this imports JAX

  experiment.setup_logging()
  # A refused config, a busy or full workdir, bad labels or images: one line, not a traceback.
  with experiment.one_line_errors(_WORKDIR.value):
    experiment.run(_CONFIG.value, _WORKDIR.value, evaluate=not _NO_EVAL.value)


if __name__ == '__main__':
  app.run(main, flags_parser=entry.parse_flags)
