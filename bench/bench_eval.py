"""Benchmark of evaluation throughput (not a test): `evaluate.evaluate` with the next batch's
device work dispatched before the host evaluates the current one (`overlap=True`, what eval.py
does) against one batch at a time (`overlap=False`, the previous loop), side by side in one run.

The synthetic test split (SYNTH, generated here) at eval size 224 with `vgg_tiny`, CAM and
Grad-CAM for both heads, WSOL box + mask evaluators and fidelity. Both runs evaluate the same
images with the same weights; their results must be identical.

Usage: python bench/bench_eval.py [--num_test 256] [--batch 32] [--reps 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import synthetic  # noqa: E402
from dualsig_jax import data, evaluate  # noqa: E402
from dualsig_jax.train import stage as stage_lib  # noqa: E402


def _config(root, num_test, batch):
  c = synthetic.get_config()
  c.unlock()
  c.model.arch = 'vgg_tiny'
  c.model.large_feature_map = False
  c.input.data_root = os.path.join(root, 'data')
  c.input.metadata_root = os.path.join(root, 'data', 'metadata')
  c.input.synthetic.update(dict(num_train=4, num_val=2, num_test=num_test, seed=7))
  c.input.eval_size = 224
  c.eval.batch_size = batch
  c.eval.methods = ('cam', 'gradcam')
  c.eval.num_plot_images = 0
  c.lock()
  return c


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--num_test', type=int, default=256)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--reps', type=int, default=2)
  a = p.parse_args()
  with tempfile.TemporaryDirectory() as root:
    config = _config(root, a.num_test, a.batch)
    data.ensure_synthetic(config.input)
    model = stage_lib.build_stage_model(config, 'dual')
    variables = jax.device_get(stage_lib.fresh_variables(config, model))
    out = os.path.join(root, 'out')
    evaluate.evaluate(config, out, variables=variables)  # compile, warm the page cache
    times = {False: [], True: []}
    results = {}
    for _ in range(a.reps):  # interleaved: the machine's load drifts
      for overlap in (False, True):
        t0 = time.perf_counter()
        results[overlap] = evaluate.evaluate(config, out, variables=variables, overlap=overlap)
        times[overlap].append(time.perf_counter() - t0)
  n = results[True]['num_images']
  same = results[True] == results[False]
  before, after = n / min(times[False]), n / min(times[True])
  print(
    f'machine: {platform.machine()} {platform.processor() or ""}, {os.cpu_count()} cores, '
    f'devices {jax.devices()}; python {platform.python_version()}, jax {jax.__version__}, '
    f'numpy {np.__version__}'
  )
  print(
    f'SYNTH test at 224 px, vgg_tiny, {n} images, eval batch {a.batch}, methods cam + gradcam, '
    f'both heads; best of {a.reps} runs each'
  )
  print(f'one batch at a time (before): {before:.1f} img/s')
  print(f'dispatch before blocking (after): {after:.1f} img/s')
  print(f'ratio after / before: {after / before:.2f}; results identical: {same}')
  if not same:
    raise SystemExit('the two loops gave different results')


if __name__ == '__main__':
  main()
