"""One process of the multi-process evaluation test (tests/test_eval_distributed.py).

Evaluates the checkpoints of WORKDIR on the small SYNTH split of DATA_ROOT with the test's
config and writes the returned results to OUT.<process index>.json. Runs under jax.distributed
when JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID) is set, else alone.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jax

from dualsig_jax.train import sharding


def main():
  distributed = sharding.maybe_initialize_distributed()
  import test_eval_distributed as t  # the config and data of the test

  from dualsig_jax import evaluate

  config = t.eval_config(os.environ['DATA_ROOT'])
  results = evaluate.evaluate(config, os.environ['WORKDIR'])
  with open(f'{os.environ["OUT"]}.{jax.process_index()}.json', 'w') as f:
    json.dump(results, f)
  if distributed:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main()
