"""Two processes on localhost (jax.distributed, CPU collectives, 2 devices each) train the same
steps as one process and end with the same parameters."""

import jax
import numpy as np
import processes
import test_train as tt
from jax.sharding import Mesh


def test_two_processes_match_one(tmp_path):
  out = str(tmp_path / 'params')
  # 2 processes with 2 devices each (the caller's XLA flags, e.g. CI's AVX2 cap, are kept).
  processes.wait(processes.launch('distributed_worker.py', 2, 4, OUT=out))
  for stage in ('vanilla', 'dual'):
    model, variables, tx, _ = tt._tiny_setup(stage, lr=0.01)
    batches = [tt._batch(seed=i) for i in range(3)]
    ref = tt._run_steps(
      Mesh(np.asarray(jax.devices()[:1]), ('data',)), model, variables, tx, batches, stage=stage
    )
    got = np.load(out + f'.{stage}.npz')
    flat = {
      jax.tree_util.keystr(p): np.asarray(v)
      for p, v in jax.tree_util.tree_flatten_with_path(ref.params)[0]
    }
    assert set(flat) == set(got.files)
    for k, v in flat.items():
      np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-5, err_msg=f'{stage} {k}')
