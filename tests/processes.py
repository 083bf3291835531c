"""Launching a test's jax.distributed job on localhost: N processes sharing a fixed number of
fake CPU devices (the caller's XLA flags, e.g. an ISA cap, are kept), and waiting for them."""

import os
import socket
import subprocess
import sys

from xla_flags import with_device_count

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
_CLUSTER = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(script: str, num_processes: int, num_devices: int, **env_vars) -> list:
  """Starts `tests/<script>` as `num_processes` processes with `num_devices // num_processes`
  devices each (one process: no cluster variables), `env_vars` added to each environment."""
  port = free_port()
  procs = []
  for pid in range(num_processes):
    env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=with_device_count(num_devices // num_processes),
      PYTHONPATH=os.pathsep.join([ROOT, HERE]),
      **{k: str(v) for k, v in env_vars.items()},
    )
    for k in _CLUSTER:
      env.pop(k, None)
    if num_processes > 1:
      env.update(
        JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
        JAX_NUM_PROCESSES=str(num_processes),
        JAX_PROCESS_ID=str(pid),
      )
    procs.append(
      subprocess.Popen(
        [sys.executable, os.path.join(HERE, script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
      )
    )
  return procs


def wait(procs, timeout: int = 600) -> None:
  """Waits for every process; a failure shows the end of its log."""
  logs = [p.communicate(timeout=timeout)[0].decode(errors='replace') for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
