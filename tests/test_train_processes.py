"""train.py's loader and loop give the same run on any process count (issue: one host or a pod).

1 process with 2 devices against 2 jax.distributed processes on localhost with 1 device each:
every device gets the same per-device batch shape in both, so XLA:CPU rounds alike (also under
--xla_cpu_max_isa=AVX2) and the runs must agree bit for bit: the same logged metrics at every
step and the same final parameters. Augmentation is on and the run crosses an epoch boundary,
so the global order, the dropped remainder and the per-image crops and flips are all covered.
A run stopped after 2 processes trained the first half and resumed by 1 process must be the
same as the uninterrupted run.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import processes  # noqa: E402

from configs import synthetic  # noqa: E402
from dualsig_jax.train import speed  # noqa: E402

NUM_DEVICES = 2  # in all, in every run
GLOBAL_BATCH = 8
NUM_TRAIN = 36  # 4 global batches per epoch and 4 images dropped
STEPS = 6  # crosses into the second epoch


def train_config(data_root, max_steps):
  """The tests' experiment: the vanilla stage of resnet_tiny on 36 32-px crops of SYNTH."""
  c = synthetic.get_config('smoke')
  c.unlock()
  c.stages = ('vanilla',)
  c.input.data_root = str(data_root)
  c.input.metadata_root = os.path.join(str(data_root), 'metadata')
  c.input.synthetic.update(dict(num_train=NUM_TRAIN, num_val=2, num_test=2, image_size=48, seed=5))
  c.input.synthetic.generate = True
  c.input.resize_size, c.input.crop_size, c.input.eval_size = 40, 32, 32
  c.input.batch_size = GLOBAL_BATCH
  c.input.num_workers = 0  # worker counts are covered by tests/test_loaders.py
  c.input.augment = True
  c.vanilla.max_steps = int(max_steps)
  c.log_every_steps = 1
  c.checkpoint.every_steps = 1000  # only the last step is saved
  c.lock()
  return c


def _launch(root, workdir, out, num_processes, max_steps):
  return processes.launch(
    'train_worker.py',
    num_processes,
    NUM_DEVICES,
    DATA_ROOT=root / 'data',
    WORKDIR=workdir,
    OUT=out,
    MAX_STEPS=max_steps,
  )


def _wait(procs):
  processes.wait(procs)


def _records(workdir):
  """{step: metrics} of the training records (timing left out)."""
  with open(os.path.join(str(workdir), 'metrics.jsonl')) as f:
    recs = [json.loads(line) for line in f if line.strip()]
  return {
    r['step']: {k: v for k, v in r.items() if k not in speed.SPEED_FIELDS}
    for r in recs
    if r.get('stage') == 'vanilla' and 'loss' in r
  }


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Three runs at once (their start-up and compiles overlap), then the resume."""
  from dualsig_jax import data

  root = tmp_path_factory.mktemp('train_processes')
  data.ensure_synthetic(train_config(root / 'data', STEPS).input)
  plan = {'one': (1, STEPS), 'two': (2, STEPS), 'half': (2, STEPS // 2)}
  procs = [
    p for name, (n, k) in plan.items() for p in _launch(root, root / name, root / name, n, k)
  ]
  _wait(procs)
  shutil.copytree(root / 'half', root / 'resumed')
  _wait(_launch(root, root / 'resumed', root / 'resumed', 1, STEPS))
  return root


def _same_run(root, name, ref='one'):
  got, want = _records(root / name), _records(root / ref)
  assert sorted(want) == list(range(1, STEPS + 1))
  assert got == want  # every logged value at every step, exactly
  a, b = np.load(root / f'{name}.vanilla.npz'), np.load(root / f'{ref}.vanilla.npz')
  assert sorted(a.files) == sorted(b.files) and a.files
  for k in b.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.numerics
def test_two_processes_train_exactly_as_one(runs):
  _same_run(runs, 'two')


@pytest.mark.numerics
def test_a_run_resumed_on_another_process_count_is_the_uninterrupted_run(runs):
  assert max(_records(runs / 'half')) == STEPS // 2
  _same_run(runs, 'resumed')
  # Loss differs between steps: the test would notice a repeated or skipped batch.
  losses = [r['loss'] for _, r in sorted(_records(runs / 'one').items())]
  assert len(set(losses)) == STEPS


def _tensorboard_loss_steps(workdir):
  """(event files, loss steps in file order) of the vanilla stage's TensorBoard folder."""
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

  logdir = os.path.join(str(workdir), 'tensorboard', 'vanilla')
  files = sorted(f for f in os.listdir(logdir) if f.startswith('events.out.tfevents.'))
  steps = []
  for f in files:
    for e in EventFileLoader(os.path.join(logdir, f)).Load():
      steps += [e.step for v in e.summary.value if v.tag == 'loss']
  return files, steps


def test_only_process_0_writes_tensorboard_and_the_resume_continues_its_curves(runs):
  files, steps = _tensorboard_loss_steps(runs / 'two')
  assert len(files) == 1, files  # one writer for the two processes
  assert steps == list(range(1, STEPS + 1))
  # 2 processes for the first half, 1 for the rest: one file per run, each step once.
  files, steps = _tensorboard_loss_steps(runs / 'resumed')
  assert len(files) == 2, files
  assert steps == list(range(1, STEPS + 1))
