"""Two processes on localhost (jax.distributed, CPU collectives, 2 devices each) train the same
steps as one process and end with the same parameters."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import test_train as tt
from jax.sharding import Mesh

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  port = _free_port()
  out = str(tmp_path / 'params')
  procs = []
  for pid in range(2):
    env = dict(
      os.environ,
      JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
      JAX_NUM_PROCESSES='2',
      JAX_PROCESS_ID=str(pid),
      JAX_PLATFORMS='cpu',
      OUT=out,
      XLA_FLAGS='--xla_force_host_platform_device_count=2',
      PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]),
    )
    procs.append(
      subprocess.Popen(
        [sys.executable, os.path.join(HERE, 'distributed_worker.py')],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
      )
    )
  logs = [p.communicate(timeout=300)[0].decode(errors='replace') for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
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
