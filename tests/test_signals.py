"""SIGTERM (preemption) and SIGINT (Ctrl-C): checkpoint, no orphaned process, non-zero exit,
and never the next stage.

The subprocess tests run train.py with 2 grain worker processes in a session of its own, so
every process it starts (workers, multiprocessing's resource tracker) shares its process group
and can be looked for after it exits.
"""

import os
import signal
import subprocess
import time

import pytest
import smoke_helpers
from smoke_helpers import ROOT, checkpoint_steps, smoke_config, train_cmd

from dualsig_jax import experiment
from dualsig_jax.train import checkpoints, interrupt

smoke_data = smoke_helpers.smoke_data

# No periodic checkpoint: the only one a stopped run can have is the one the signal made.
NO_PERIODIC = '--config.checkpoint.every_steps=100000'


def _alive_in_group(pgid: int) -> list[str]:
  """Processes of process group `pgid` that are not zombies ('pid command')."""
  if not os.path.isdir('/proc'):  # no procfs: ask the kernel (zombies count as alive)
    try:
      os.killpg(pgid, 0)
    except ProcessLookupError:
      return []
    return [f'group {pgid}']
  out = []
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/stat') as f:
        stat = f.read()
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        cmd = f.read().replace(b'\0', b' ').decode(errors='replace')[:120]
    except OSError:
      continue
    fields = stat.rsplit(')', 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
    if int(fields[2]) == pgid and fields[0] != 'Z':
      out.append(f'{pid} {cmd}')
  return out


def _wait_for_training(proc, workdir, timeout=300.0):
  """Returns once metrics.jsonl has a training record (steps are running)."""
  path = os.path.join(str(workdir), 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, 'train.py exited before training started'
    if os.path.exists(path):
      with open(path) as f:
        if any('"loss"' in line for line in f):
          return
    time.sleep(0.1)
  raise AssertionError('no training step within the timeout')


def _stop_run(data_root, workdir, tmp_path, signum, *, whole_group):
  """Starts a long run with 2 workers, signals it once steps run; returns (rc, stderr)."""
  err_path = tmp_path / f'stderr.{signum}'
  with open(err_path, 'wb') as err:
    proc = subprocess.Popen(
      train_cmd(data_root, workdir, 100000, '--config.input.num_workers=2', NO_PERIODIC),
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=err,
      start_new_session=True,
    )
  pgid = proc.pid
  try:
    _wait_for_training(proc, workdir)
    # A terminal's Ctrl-C reaches the whole foreground group (the workers too); a
    # preemption notice may reach the main process only.
    if whole_group:
      os.killpg(pgid, signum)
    else:
      proc.send_signal(signum)
    rc = proc.wait(timeout=120)
    deadline, alive = time.time() + 10, _alive_in_group(pgid)
    while alive and time.time() < deadline:
      time.sleep(0.2)
      alive = _alive_in_group(pgid)
  finally:
    if proc.poll() is None or _alive_in_group(pgid):
      os.killpg(pgid, signal.SIGKILL)
      proc.wait()
  assert not alive, f'processes left running after exit: {alive}'
  return rc, err_path.read_text(errors='replace')


def test_sigterm_saves_a_checkpoint_stops_workers_and_resumes(smoke_data, tmp_path):
  workdir = tmp_path / 'run'
  rc, err = _stop_run(smoke_data, workdir, tmp_path, signal.SIGTERM, whole_group=False)
  assert rc == 128 + signal.SIGTERM, err[-3000:]
  saved = checkpoint_steps(workdir)
  assert saved and saved[-1] > 0, err[-3000:]
  assert 'run the same command again to resume' in err
  # The same run again (max_steps may change on resume) continues from that checkpoint.
  k = saved[-1]
  done = subprocess.run(
    train_cmd(smoke_data, workdir, k + 2, '--config.input.num_workers=2', NO_PERIODIC),
    cwd=ROOT,
    capture_output=True,
  )
  assert done.returncode == 0, done.stderr.decode(errors='replace')[-3000:]
  starts = [r for r in smoke_helpers.metrics(workdir) if r.get('event') == 'start']
  assert starts[-1]['origin'] == f'resumed from step {k}'
  assert checkpoint_steps(workdir)[-1] == k + 2


def test_ctrl_c_to_the_process_group_saves_and_exits_130(smoke_data, tmp_path):
  workdir = tmp_path / 'run'
  rc, err = _stop_run(smoke_data, workdir, tmp_path, signal.SIGINT, whole_group=True)
  assert rc == 128 + signal.SIGINT, err[-3000:]
  saved = checkpoint_steps(workdir)
  assert saved and saved[-1] > 0, err[-3000:]
  # The saved step is readable (state and the data loader state of 2 workers).
  mgr = checkpoints.manager(os.path.join(workdir, 'vanilla', 'checkpoints'), max_to_keep=2)
  checkpoints.check_files(checkpoints.step_dir(mgr, saved[-1]), data=True)


def test_ctrl_c_during_a_stage_teardown_stops_before_the_next_stage(
  smoke_data, tmp_path, monkeypatch
):
  """A SIGINT that arrives while the vanilla stage saves its last checkpoint: the save
  completes, the stage's workers are shut down, and the dual stage never starts."""
  config = smoke_config(smoke_data, **{'vanilla.max_steps': 2, 'checkpoint.every_steps': 100})
  real_save = checkpoints.save

  def save_and_interrupt(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    return real_save(*args, **kwargs)

  monkeypatch.setattr(checkpoints, 'save', save_and_interrupt)
  before = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
  with pytest.raises(interrupt.Interrupted) as e:
    experiment.run(config, str(tmp_path), evaluate=False)
  assert e.value.code == 128 + signal.SIGINT
  assert checkpoint_steps(tmp_path) == [2]
  assert not os.path.exists(tmp_path / 'dual'), 'the next stage started'
  # The handlers are the previous ones again (whatever the process had: pytest's Ctrl-C
  # handling, normally).
  assert {s: signal.getsignal(s) for s in interrupt.SIGNALS} == before


def test_handler_defers_inside_the_loop_and_raises_outside():
  with interrupt.handling():
    with interrupt.deferred():
      os.kill(os.getpid(), signal.SIGTERM)
      assert interrupt.requested() == signal.SIGTERM  # flagged, nothing raised
    with pytest.raises(interrupt.Interrupted) as e:
      interrupt.raise_if_requested()
    assert e.value.code == 143
  with interrupt.handling():
    assert interrupt.requested() is None  # a new run starts clean
    with pytest.raises(interrupt.Interrupted):
      os.kill(os.getpid(), signal.SIGTERM)  # outside the step loop: at once
      time.sleep(1)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
