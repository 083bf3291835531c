"""Evaluates a trained workdir, or any dual-branch checkpoint folder:

  python eval.py --config configs/synthetic.py --workdir runs/synthetic
  python eval.py --config configs/imagenet.py:resnet50 --workdir runs/ref --checkpoint CONVERTED

Logic lives in dualsig_jax.evaluate."""

import sys

from absl import app, flags
from ml_collections import config_flags

from dualsig_jax import entry

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file (configs/*.py[:arg]).', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Workdir of a finished train.py run, or where to write the results.'
)
_CHECKPOINT = flags.DEFINE_string(
  'checkpoint',
  None,
  'Evaluate this dual-branch checkpoint folder instead of <workdir>/dual/checkpoints: a '
  'converter output (python -m dualsig_jax.convert) or any stage checkpoint folder.',
)
_SPLIT = flags.DEFINE_string('split', None, 'Split to evaluate (default: config.input.eval_split).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  entry.check_config_or_exit(
    _CONFIG.value, _WORKDIR.value, for_eval=True, checkpoint=_CHECKPOINT.value
  )
  import contextlib

  import jax

  from dualsig_jax import evaluate, experiment, workdir  # after the preflight: these import JAX
  from dualsig_jax.train import interrupt, sharding

  experiment.setup_logging()
  sharding.maybe_initialize_distributed()
  # SIGTERM / Ctrl-C: exit 128 + signal, no stray workers; a full disk or a bad image: one line.
  with interrupt.handling(), experiment.one_line_errors(_WORKDIR.value):
    try:
      # The workdir's lock: no evaluation of a moving target while train.py runs there.
      first = jax.process_index() == 0
      with workdir.locked(_WORKDIR.value) if first else contextlib.nullcontext():
        evaluate.evaluate(
          _CONFIG.value, _WORKDIR.value, split=_SPLIT.value, checkpoint=_CHECKPOINT.value
        )
    except (*evaluate.USER_ERRORS, workdir.WorkdirBusyError) as e:  # one line, not a trace
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=entry.parse_flags)
