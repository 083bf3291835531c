"""One run per workdir: a second run is refused naming the holder; the lock of a killed run
does not block; stale temporaries of a killed save are removed under the lock."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from smoke_helpers import ROOT, smoke_config

from dualsig_jax import experiment, workdir
from dualsig_jax.train import resume


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
  wd = str(tmp_path / 'run')
  config = smoke_config(tmp_path / 'data')
  with workdir.locked(wd):
    with pytest.raises(workdir.WorkdirBusyError) as e:
      experiment.run(config, wd, evaluate=False)
  msg = str(e.value)
  assert f'pid {os.getpid()}' in msg and socket.gethostname() in msg and wd in msg
  assert not (tmp_path / 'data').exists(), 'the refused run generated data'
  with workdir.locked(wd):  # released: the next run takes it
    pass


def test_the_lock_of_a_killed_run_does_not_block(tmp_path):
  wd = str(tmp_path / 'run')
  code = (
    'import sys, time; sys.path.insert(0, sys.argv[2]); from dualsig_jax import workdir\n'
    'with workdir.locked(sys.argv[1]):\n  print("locked", flush=True); time.sleep(60)\n'
  )
  p = subprocess.Popen([sys.executable, '-c', code, wd, ROOT], stdout=subprocess.PIPE, text=True)
  try:
    assert p.stdout.readline().strip() == 'locked'
    with pytest.raises(workdir.WorkdirBusyError, match=f'pid {p.pid} on host'):
      with workdir.locked(wd):
        pass
  finally:
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert os.path.exists(os.path.join(wd, workdir.LOCK_FILE))  # the file stays ...
  t0 = time.monotonic()
  with workdir.locked(wd):  # ... but no process holds it
    assert time.monotonic() - t0 < 1


def test_unfinished_saves_of_a_killed_run_are_removed_at_start(tmp_path):
  """A second SIGTERM during a save leaves `<step>.orbax-checkpoint-tmp-*`: removed under the
  lock before anything else (here the run then stops on a refused config change)."""
  config = smoke_config(tmp_path / 'data')
  wd = tmp_path / 'run'
  resume.check_and_write_config(config, str(wd))
  ckpts = wd / 'vanilla' / 'checkpoints'
  (ckpts / '4').mkdir(parents=True)
  stale = ckpts / '8.orbax-checkpoint-tmp-1733100000'
  (stale / 'state').mkdir(parents=True)
  (stale / 'state' / 'x').write_text('half')
  changed = smoke_config(tmp_path / 'data', **{'vanilla.lr': 0.1})
  with pytest.raises(resume.ConfigChangedError):
    experiment.run(changed, str(wd), evaluate=False)
  assert sorted(os.listdir(ckpts)) == ['4']
