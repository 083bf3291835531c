"""Re-evaluates a trained workdir: python eval.py --config configs/synthetic.py --workdir
runs/synthetic. Logic lives in dualsig_jax.evaluate."""

from absl import app, flags
from ml_collections import config_flags

from dualsig_jax import entry

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file (configs/*.py[:arg]).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a finished train.py run.')
_SPLIT = flags.DEFINE_string('split', None, 'Split to evaluate (default: config.input.eval_split).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  entry.check_config_or_exit(_CONFIG.value, _WORKDIR.value, for_eval=True)
  from dualsig_jax import evaluate, experiment  # after the preflight: these import JAX
  from dualsig_jax.train import interrupt, sharding

  experiment.setup_logging()
  sharding.maybe_initialize_distributed()
  with interrupt.handling():  # SIGTERM / Ctrl-C: exit 128 + signal, no stray workers
    evaluate.evaluate(_CONFIG.value, _WORKDIR.value, split=_SPLIT.value)


if __name__ == '__main__':
  app.run(main, flags_parser=entry.parse_flags)
