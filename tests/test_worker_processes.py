"""grain worker processes clean up: no orphan after kill -9 of the parent, no leaked shared
memory at exit (multiprocessing's resource tracker prints a warning for each leaked block).

The scripts run in a session of their own, so every process they start (workers, the
resource tracker) shares their process group and can be looked for after the parent dies.
"""

import os
import signal
import subprocess
import sys
import time

import smoke_helpers
from data_helpers import synth_dir  # noqa: F401 (fixture)
from smoke_helpers import ROOT, smoke_config
from test_signals import _alive_in_group

smoke_data = smoke_helpers.smoke_data

# Reads batches of both loaders with 2 workers each, the eval loader the way evaluate.py does
# (itertools.islice: the iterator is never exhausted); nothing is closed by the script, and
# batches are still referenced at exit (grain 0.2's own iterators leak blocks here).
SCRIPT = """
import itertools, sys, time
sys.path.insert(0, {tests!r})
from data_helpers import input_config
from dualsig_jax.data import loaders
KEEP = []

def main():
  cfg = input_config({root!r}, num_workers=2)
  train = iter(loaders.make_train_loader(
    cfg, seed=0, num_epochs=None, process_index=0, process_count=1, batch_size=8))
  KEEP.extend([train, next(train), next(train)])
  KEEP.extend(itertools.islice(loaders.make_eval_loader(cfg, 'test', batch_size=8), 1))
  for batch in itertools.islice(loaders.make_eval_loader(cfg, 'test', batch_size=8), 1):
    pass  # as evaluate.py: the unexhausted iterator is dropped at the end of the loop
  print('ready', flush=True)
  if {hang!r}:
    time.sleep(600)

if __name__ == '__main__':
  main()
"""


def _start(tmp_path, root, hang):
  path = tmp_path / 'script.py'
  path.write_text(SCRIPT.format(tests=os.path.dirname(__file__), root=root, hang=hang))
  return subprocess.Popen(
    [sys.executable, str(path)],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    start_new_session=True,
  )


def test_kill_9_of_the_parent_leaves_no_worker(synth_dir, tmp_path):  # noqa: F811
  proc = _start(tmp_path, synth_dir, hang=True)
  pgid = proc.pid
  try:
    assert proc.stdout.readline().strip() == b'ready', proc.stderr.read()[-3000:]
    assert len(_alive_in_group(pgid)) >= 3  # the parent and its workers (all 4 run until exit)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline, alive = time.time() + 10, _alive_in_group(pgid)
    while alive and time.time() < deadline:
      time.sleep(0.2)
      alive = _alive_in_group(pgid)
  finally:
    if _alive_in_group(pgid):
      os.killpg(pgid, signal.SIGKILL)
  assert not alive, f'processes left running 10 s after the parent was killed: {alive}'


def test_loaders_leave_no_shared_memory_at_exit(synth_dir, tmp_path):  # noqa: F811
  proc = _start(tmp_path, synth_dir, hang=False)
  out, err = proc.communicate(timeout=300)
  err = err.decode(errors='replace')
  assert proc.returncode == 0 and out.strip() == b'ready', err[-3000:]
  assert 'resource_tracker' not in err and 'leaked' not in err, err[-3000:]
  assert 'Exception ignored' not in err, err[-3000:]  # e.g. a __del__ failing at shutdown


def test_a_smoke_run_prints_no_leak_warning(smoke_data, tmp_path):
  """train.py (both stages, 2 workers) and its evaluation: stderr has no tracker warning."""
  c = smoke_config(smoke_data)
  cmd = [
    sys.executable,
    os.path.join(ROOT, 'train.py'),
    f'--config={os.path.join(ROOT, "configs", "synthetic.py")}:smoke',
    f'--workdir={tmp_path / "run"}',
    f'--config.input.data_root={c.input.data_root}',
    f'--config.input.metadata_root={c.input.metadata_root}',
    '--config.input.num_workers=2',
    '--config.vanilla.max_steps=2',
    '--config.dual.max_steps=2',
    '--config.eval.max_batches=1',
    "--config.eval.methods=('cam',)",
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=600)
  err = proc.stderr.decode(errors='replace')
  assert proc.returncode == 0, err[-3000:]
  assert os.path.isfile(tmp_path / 'run' / 'results.json')
  bad = [line for line in err.splitlines() if 'resource_tracker' in line or 'leaked' in line]
  assert not bad, bad
