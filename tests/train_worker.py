"""One process of the multi-process training tests (tests/test_train_processes.py).

Runs `experiment.run` (train.py's path: config check, loader, loop, checkpoints) on the test's
tiny config without evaluation, then process 0 writes the final parameters of each stage to
OUT.<stage>.npz. Environment: DATA_ROOT, WORKDIR, OUT, MAX_STEPS (vanilla steps), and
JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID) for a multi-process run.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jax
import numpy as np

from dualsig_jax.train import sharding


def _final_params(config, workdir, stage):
  """{'path': array} of the stage's newest checkpoint, read back through the loop's own set-up."""
  from dualsig_jax.train import checkpoints, loop
  from dualsig_jax.train import stage as stage_lib

  st = loop._set_up(config, workdir, stage)
  target = st.make_state(stage_lib.fresh_variables(config, st.model))
  state, _ = checkpoints.restore(st.mgr, st.mgr.latest_step(), target)
  return {
    jax.tree_util.keystr(p): np.asarray(v)
    for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]
  }


def main():
  distributed = sharding.maybe_initialize_distributed()
  import test_train_processes as t  # the test's config

  from dualsig_jax import experiment

  config = t.train_config(os.environ['DATA_ROOT'], int(os.environ['MAX_STEPS']))
  experiment.run(config, os.environ['WORKDIR'], evaluate=False)
  for stage in config.stages:
    params = _final_params(config, os.environ['WORKDIR'], stage)
    if jax.process_index() == 0:
      np.savez(f'{os.environ["OUT"]}.{stage}.npz', **params)
  if distributed:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main()
