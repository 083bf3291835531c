"""The accelerator benchmark runs end to end at toy size on CPU, so it cannot rot unnoticed.

Runs ``bench/bench_accelerator.py --toy`` as a user would (a subprocess), then checks its JSON:
one row per (model, precision, measurement) with positive, finite numbers, the ratio being
JAX / torch, and the JAX and torch mirrors computing the same logits from the same weights.
The throughput numbers themselves are not checked (CPU, toy size, shared machine).
"""

import itertools
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip('torch')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ('resnet_tiny', 'vgg_tiny')
PRECISIONS = ('float32', 'bfloat16')
WHATS = ('vanilla_step', 'dual_step', 'cam', 'gradcam')
NUMBERS = ('jax_img_s', 'torch_img_s', 'ratio', 'jax_first_call_s', 'torch_first_call_s')


@pytest.fixture(scope='module')
def toy_result(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'accelerator.json'
  env = dict(os.environ)
  # One plain CPU device (not the suite's 8 fake ones); XLA's cheapest codegen: toy timings
  # mean nothing here, and compiling 16 programs dominates the run.
  env['XLA_FLAGS'] = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
  env['JAX_PLATFORMS'] = 'cpu'
  proc = subprocess.run(
    [sys.executable, 'bench/bench_accelerator.py', '--toy', '--device', 'cpu', '--out', str(out)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def test_every_row_has_positive_finite_numbers(toy_result):
  result, _ = toy_result
  keys = [(r['model'], r['precision'], r['what']) for r in result['rows']]
  assert sorted(keys) == sorted(itertools.product(MODELS, PRECISIONS, WHATS))
  for row in result['rows']:
    for name in NUMBERS:
      value = row[name]
      assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, row)
    assert row['ratio'] == pytest.approx(row['jax_img_s'] / row['torch_img_s'], rel=1e-9)


def test_header_and_table_are_printed(toy_result):
  result, stdout = toy_result
  assert result['jax_device'].startswith('cpu')
  assert result['torch_device'].startswith('cpu')
  for name in ('jax', 'jaxlib', 'flax', 'torch'):
    assert result['versions'][name], name
  assert result['settings'] == dict(size=64, batch=8, steps=2, repeats=1, num_classes=10)
  assert result['complete'] is True
  # The Markdown table: a header, a rule and one line per row.
  table = [line for line in stdout.splitlines() if line.startswith('| ')]
  assert len(table) == 1 + len(result['rows'])


def test_torch_mirrors_compute_the_same_logits(toy_result):
  # Same weights through dualsig_jax.convert.flax_to_torch: float32 logits agree, so both
  # frameworks time the same network.
  result, _ = toy_result
  assert set(result['parity_rel_max_diff']) == set(MODELS)
  for arch, diff in result['parity_rel_max_diff'].items():
    assert diff < 1e-4, (arch, diff)


def test_loader_headroom_smoke(tmp_path):
  # bench/bench_loader.py --mode headroom at smoke size: 32 small JPEGs, in-process loaders.
  out = tmp_path / 'headroom.json'
  cmd = [sys.executable, 'bench/bench_loader.py', '--mode', 'headroom', '--num_images', '32']
  cmd += ['--batch_size', '8', '--stage_images', '4', '--stage_repeats', '1', '--repeats', '1']
  cmd += ['--headroom_workers', '0', '--headroom_size', '200x150', '--data_dir', str(tmp_path)]
  proc = subprocess.run(
    cmd + ['--out', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result['image_size'] == [200, 150]
  stages = result['stage']['ms_per_image']
  assert {'decode PIL (load_rgb)', 'train total: decode + train_crop + normalise'} <= set(stages)
  for name, ms in stages.items():
    assert math.isfinite(ms) and ms > 0, (name, ms)
  assert [(r['mode'], r['workers']) for r in result['loaders']] == [('train', 0), ('eval', 0)]
  for row in result['loaders']:
    assert math.isfinite(row['img_s']) and row['img_s'] > 0, row


def test_wsol_bench_smoke(tmp_path):
  # bench/bench_wsol.py at smoke size: both map sets, every run (one core, threads, processes,
  # fallback) gives the reference's metrics and a positive ratio.
  out = tmp_path / 'wsol.json'
  cmd = [sys.executable, 'bench/bench_wsol.py', '--num_maps', '4', '--interval', '0.05']
  cmd += ['--repeat', '1', '--workers', '2', '--out', str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result['kernel'].startswith('native: ')
  assert [r['set'] for r in result['results']] == ['realistic', 'speckle']
  for r in result['results']:
    runs = [row['run'] for row in r['rows']]
    assert runs[0].startswith('reference') and len(runs) == 5, runs
    assert {'kernel, one core', 'kernel, 2 threads', 'kernel, 2 processes'} <= set(runs)
    for row in r['rows'][1:]:
      assert row['identical'] is True, row
      assert math.isfinite(row['ratio']) and row['ratio'] > 0, row
