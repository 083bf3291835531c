"""One process of the 2-process jax.distributed test (tests/test_distributed.py).

Each process feeds its half of every global batch to the same sharded train step; process 0
writes the final parameters. Environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID, XLA_FLAGS (devices per process), OUT (npz path).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import numpy as np

from dualsig_jax.train import sharding


def main():
  assert sharding.maybe_initialize_distributed()
  import test_train as tt  # the same setup and step as the single-process tests

  for stage in ('vanilla', 'dual'):
    model, variables, tx, _ = tt._tiny_setup(stage, lr=0.01)
    batches = [tt._batch(seed=i) for i in range(3)]
    n, i = jax.process_count(), jax.process_index()
    local = [{k: v[i * len(v) // n : (i + 1) * len(v) // n] for k, v in b.items()} for b in batches]
    state = tt._run_steps(sharding.make_mesh(), model, variables, tx, local, stage=stage)
    if i == 0:
      flat = {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]
      }
      np.savez(os.environ['OUT'] + f'.{stage}.npz', **flat)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
