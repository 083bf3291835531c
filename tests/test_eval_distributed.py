"""Evaluation under jax.distributed: two processes on localhost (CPU devices, gloo collectives)
give exactly the metrics of one process, on a split whose size the batch does not divide."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import processes  # noqa: E402

from configs import synthetic  # noqa: E402

# 35 = 4 global batches of 8 + 3 images: in the last batch process 0 has 3 images and a padding
# row, process 1 only padding (it must still run the batch, or the collectives would hang).
NUM_TEST = 35
EVAL_BATCH = 8  # global: 4 per process in the two-process run
# Devices in all, in both runs: 1 process with 2 devices against 2 processes with 1 device each.
# Like is compared with like: every device gets the same per-device batch shape in both runs.
# XLA:CPU's rounding depends on that shape (on AVX2 machines a 4-image and a 2-image batch give
# maps 1 ulp apart), which would hide what this test checks: that the combination across
# processes is exact.
NUM_DEVICES = 2


def eval_config(data_root):
  """The test's experiment: tiny ResNet, NUM_TEST test images of SYNTH, small eval size."""
  c = synthetic.get_config('smoke')
  c.unlock()
  c.input.data_root = str(data_root)
  c.input.metadata_root = os.path.join(str(data_root), 'metadata')
  c.input.synthetic.update(dict(num_train=4, num_val=2, num_test=NUM_TEST, seed=3))
  c.input.synthetic.generate = True
  c.input.eval_size = 64
  c.input.num_workers = 0
  c.eval.batch_size = EVAL_BATCH
  c.eval.save_scoremaps = True
  c.eval.num_plot_images = 2
  c.eval.methods = ('cam',)  # the combination does not depend on the method; one compiles faster
  c.lock()
  return c


def _save(path, variables, config):
  from dualsig_jax.train import checkpoints
  from dualsig_jax.train import stage as stage_lib

  mgr = checkpoints.manager(path, max_to_keep=1)
  checkpoints.save(mgr, 1, jax.device_get(variables), None, stage_lib.model_record(config, 'dual'))


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """SYNTH data and a workdir with freshly initialised dual and vanilla checkpoints."""
  from dualsig_jax import data
  from dualsig_jax.train import stage as stage_lib

  root = tmp_path_factory.mktemp('eval_dist')
  config = eval_config(root / 'data')
  data.ensure_synthetic(config.input)
  model = stage_lib.build_stage_model(config, 'dual')
  dual = jax.device_get(stage_lib.fresh_variables(config, model))
  # The vanilla checkpoint: fc with its class columns rotated, so its Top-1 is a count of its
  # own (one init instead of two keeps the test fast).
  vanilla = jax.tree.map(lambda x: x, dual)
  vanilla['params']['fc']['kernel'] = np.roll(dual['params']['fc']['kernel'], 3, axis=-1)
  workdir = root / 'ckpt'
  _save(str(workdir / 'dual' / 'checkpoints'), dual, config)
  _save(str(workdir / 'vanilla' / 'checkpoints'), vanilla, config)
  return root, workdir


def _launch(setup, name, num_processes):
  root, ckpt = setup
  workdir = root / name
  shutil.copytree(ckpt, workdir)
  procs = processes.launch(
    'eval_worker.py',
    num_processes,
    NUM_DEVICES,
    DATA_ROOT=root / 'data',
    WORKDIR=workdir,
    OUT=root / name,
  )
  return workdir, procs


def _wait(procs):
  processes.wait(procs, timeout=300)


def _scoremaps(workdir):
  d = workdir / 'scoremaps'
  return {
    os.path.relpath(os.path.join(dp, f), d): np.load(os.path.join(dp, f))
    for dp, _, files in os.walk(d)
    for f in files
  }


@pytest.mark.numerics
def test_two_processes_give_the_metrics_of_one(setup):
  # Both runs at once: the machine's cores overlap their start-up and compilation.
  one_dir, one = _launch(setup, 'one', 1)
  two_dir, two = _launch(setup, 'two', 2)
  _wait(one + two)
  root = setup[0]
  ref = json.loads((root / 'one.0.json').read_text())
  got = [json.loads((root / f'two.{p}.json').read_text()) for p in range(2)]
  # The evaluated checkpoints: the same steps, each run's own copy of the workdir.
  for r, workdir in [(ref, one_dir)] + [(g, two_dir) for g in got]:
    for stage, src in r.pop('checkpoints').items():
      assert (src['path'], src['step']) == (str(workdir / stage / 'checkpoints'), 1), src
  assert ref['num_images'] == NUM_TEST
  assert got[0] == got[1], 'the processes disagree on the results'
  assert got[0] == ref  # exact: integer counts and order-independent sums
  assert 'vanilla_softmax_top1' in ref['classification']
  # Process 0 alone writes the results; every process writes the maps of its own images.
  written = json.loads((two_dir / 'results.json').read_text())
  assert written.pop('checkpoints')['dual']['path'] == str(two_dir / 'dual' / 'checkpoints')
  assert written == ref
  assert (two_dir / 'plots' / 'cams_cam.png').exists()
  maps_one, maps_two = _scoremaps(one_dir), _scoremaps(two_dir)
  assert len(maps_one) == NUM_TEST * len(ref['methods']) * 2
  assert set(maps_two) == set(maps_one)
  for k, v in maps_one.items():
    np.testing.assert_array_equal(maps_two[k], v, err_msg=k)


def test_fidelity_accumulator_does_not_depend_on_batching_or_merging():
  from dualsig_jax.cam.fidelity import FidelityAccumulator

  rng = np.random.default_rng(0)
  # Values of very different magnitude: a float running sum depends on their order.
  drop = (rng.random(101) * 10.0 ** rng.integers(-8, 1, 101)).astype(np.float32)
  increase = (rng.random(101) < 0.3).astype(np.float32)
  valid = rng.random(101) < 0.8
  whole = FidelityAccumulator()
  whole.accumulate({'drop': drop, 'increase': increase}, valid)
  parts = [FidelityAccumulator(), FidelityAccumulator()]
  perm = rng.permutation(101)
  for j, chunk in enumerate(np.array_split(perm, 7)):
    parts[j % 2].accumulate({'drop': drop[chunk], 'increase': increase[chunk]}, valid[chunk])
  merged = FidelityAccumulator()
  for p in parts[::-1]:
    merged.merge(p.state())
  assert merged.num_images == whole.num_images == int(valid.sum())
  assert merged.compute() == whole.compute()  # exact, not approximately
  ref = 100.0 * np.sum(drop[valid].astype(np.float64)) / valid.sum()
  assert whole.compute()['avg_drop'] == pytest.approx(ref, rel=1e-12)
  assert whole.compute()['inc_conf'] == 100.0 * np.sum(increase[valid]) / valid.sum()
  with pytest.raises(ValueError, match='before any image'):
    FidelityAccumulator().compute()
  with pytest.raises(ValueError, match='must all be'):
    whole.accumulate({'drop': drop, 'increase': increase[:3]})


def test_eval_batch_must_split_over_devices_and_processes():
  from dualsig_jax.train import sharding

  mesh = sharding.make_mesh()
  n = mesh.devices.size
  assert sharding.check_global_batch(2 * n, mesh, 'eval.batch_size') == 2 * n // jax.process_count()
  if n > 1:
    with pytest.raises(ValueError, match=f'eval.batch_size={n + 1}'):
      sharding.check_global_batch(n + 1, mesh, 'eval.batch_size')
