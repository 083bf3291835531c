"""Asynchronous checkpoints keep every guarantee: SIGTERM during a save completes it (and the
stop's own save) before exit 143, every step with its manifest; kill -9 during a save leaves
no step folder for it, and the resume reads the previous complete step."""

import json
import os
import signal
import subprocess
import sys
import time

import smoke_helpers
from smoke_helpers import ROOT, checkpoint_steps, train_cmd

from dualsig_jax.train import checkpoints

smoke_data = smoke_helpers.smoke_data
WORKER = os.path.join(ROOT, 'tests', 'slow_save_worker.py')


def _start(data_root, workdir, markers):
  cmd = train_cmd(data_root, workdir, 100000, '--config.checkpoint.async_save=True')
  env = dict(os.environ, SLOW_SAVE_MARKERS=str(markers), SLOW_SAVE_S='3')
  return subprocess.Popen(
    [sys.executable, WORKER, *cmd[2:]],
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    start_new_session=True,
  )


def _wait_for_save(proc, markers, n, timeout=600.0):
  """Returns once the n-th save (1-based) is in flight."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read().decode(errors='replace')[-3000:]
    if os.path.isdir(markers) and len(os.listdir(markers)) >= n:
      return
    time.sleep(0.05)
  raise AssertionError('no save within the timeout')


def _ckpt_dir(workdir):
  return os.path.join(str(workdir), 'vanilla', 'checkpoints')


def test_sigterm_during_an_async_save_completes_it_before_exit(smoke_data, tmp_path):
  workdir, markers = tmp_path / 'run', tmp_path / 'markers'
  proc = _start(smoke_data, workdir, markers)
  try:
    _wait_for_save(proc, markers, 2)  # step 8's save is being written (every_steps=4)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  assert rc == 128 + signal.SIGTERM, proc.stderr.read().decode(errors='replace')[-3000:]
  steps = checkpoint_steps(workdir)
  assert 8 in steps and steps[-1] >= 8, steps
  for s in steps:  # every kept step complete, with its manifest, nothing half-written left
    assert checkpoints.verify_manifest(os.path.join(_ckpt_dir(workdir), str(s))), s
  assert not [d for d in os.listdir(_ckpt_dir(workdir)) if 'tmp' in d]


def test_kill_9_during_an_async_save_resumes_from_the_previous_step(smoke_data, tmp_path):
  workdir, markers = tmp_path / 'run', tmp_path / 'markers'
  proc = _start(smoke_data, workdir, markers)
  try:
    _wait_for_save(proc, markers, 2)  # the 2nd save (step 8) is being written
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  # The step in flight never became a step folder (only Orbax's temporary one is left, which
  # no reader takes); the previous one is complete.
  assert checkpoint_steps(workdir) == [4]
  half = [d for d in os.listdir(_ckpt_dir(workdir)) if d.startswith('8.')]
  assert any(os.path.isdir(os.path.join(_ckpt_dir(workdir), d)) for d in half), (
    f'not killed mid-save: {half}'
  )
  assert checkpoints.manager(_ckpt_dir(workdir), max_to_keep=2).all_steps() == [4]
  variables, info = checkpoints.restore_variables(_ckpt_dir(workdir))
  assert info['step'] == 4 and variables['params']
  # A resume continues from step 4 (the half-written step 8 is never read).
  rc = subprocess.run(
    train_cmd(smoke_data, workdir, 6), cwd=ROOT, capture_output=True, text=True, timeout=900
  )
  assert rc.returncode == 0, rc.stderr[-3000:]
  with open(workdir / 'metrics.jsonl') as f:
    starts = [json.loads(line) for line in f if '"start"' in line]
  assert starts[-1]['origin'] == 'resumed from step 4', starts
  assert checkpoint_steps(workdir)[-1] == 6
  # The resumed run removed the half-written folder and its pending-manifest mark.
  assert not [d for d in os.listdir(_ckpt_dir(workdir)) if d.startswith('8.')]
  assert not [d for d in os.listdir(_ckpt_dir(workdir)) if d.endswith(checkpoints.PENDING)]
