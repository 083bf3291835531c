"""Benchmark: the step loop around checkpoint saves, synchronous against asynchronous Orbax.

The synthetic config's model (configs/synthetic.py: resnet_tiny, 10 classes, 112 px) and its
vanilla train step (`loop.jit_train_step`) on random batches of the config's global batch;
every `--every` steps a save through `train/checkpoints.save` (state, JSON record, manifest),
as train.py does. Both modes run the same steps; the loop's wall time (after one warm-up step)
is compared. One run prints machine, versions, both times and the ratio.

    python bench/bench_checkpoint.py [--steps 40 --every 5 --arch resnet_tiny]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _loop(config, mode: str, steps: int, every: int, folder: str) -> float:
  import jax
  import numpy as np

  from dualsig_jax import models
  from dualsig_jax.train import checkpoints, loop, optim, sharding
  from dualsig_jax.train import stage as stage_lib
  from dualsig_jax.train.state import create_state

  mesh = sharding.make_mesh()
  model = stage_lib.build_stage_model(config, 'vanilla')
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  tx, _, _ = optim.make_optimizer(
    variables['params'],
    arch=config.model.arch,
    stage='vanilla',
    optim_cfg=config.vanilla,
    steps_per_epoch=100,
    global_batch=config.input.batch_size,
  )
  state = jax.device_put(create_state(variables, tx, 0), sharding.replicated(mesh))
  step_fn = loop.jit_train_step(config, 'vanilla', model, tx, mesh)
  rng = np.random.default_rng(0)
  b, s = config.input.batch_size, config.input.crop_size
  batch = sharding.to_global(
    {
      'image': rng.normal(size=(b, s, s, 3)).astype(np.float32),
      'label': rng.integers(0, config.model.num_classes, b).astype(np.int32),
    },
    mesh,
  )
  mgr = checkpoints.manager(folder, max_to_keep=2, async_save=(mode == 'async'))
  meta = stage_lib.model_record(config, 'vanilla')
  state, m = step_fn(state, batch)  # compile + warm-up, not timed
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for i in range(1, steps + 1):
    state, m = step_fn(state, batch)
    if i % every == 0:
      float(m['loss'])  # the loop reads the loss at a save step (as train.py does)
      checkpoints.save(mgr, i, jax.device_get(state), None, meta)
  jax.block_until_ready(m)
  checkpoints.finish(mgr)  # the last save is complete in both modes
  return time.perf_counter() - t0


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=40)
  p.add_argument('--every', type=int, default=5)
  p.add_argument('--arch', default='resnet_tiny')
  a = p.parse_args()
  import jax
  import orbax.checkpoint as ocp

  from configs import synthetic

  config = synthetic.get_config()
  config.model.arch = a.arch
  print(
    f'machine: {platform.platform()}, {os.cpu_count()} CPUs, devices {jax.devices()}; python '
    f'{platform.python_version()}, jax {jax.__version__}, orbax-checkpoint {ocp.__version__}'
  )
  print(
    f'{a.arch}, global batch {config.input.batch_size}, {config.input.crop_size} px: '
    f'{a.steps} steps, a save every {a.every}'
  )
  times = {}
  for mode in ('sync', 'async'):
    folder = tempfile.mkdtemp(prefix=f'bench_ckpt_{mode}_')
    try:
      times[mode] = _loop(config, mode, a.steps, a.every, folder)
    finally:
      shutil.rmtree(folder, ignore_errors=True)
    print(f'{mode:>5}: {times[mode]:.2f} s ({a.steps / times[mode]:.2f} steps/s)', flush=True)
  print(f'ratio sync / async wall time: {times["sync"] / times["async"]:.2f}x')


if __name__ == '__main__':
  main()
