"""Benchmark: the paper's `dual` train step (only fc2 trains) against a plain forward pass, and
against the PyTorch reference's step (frozen backbone, BN eval, SGD on fc2) on the same model
and batch.

    python bench/bench_train_step.py [--arch resnet50] [--batch 16] [--size 224] [--iters 5]

Prints machine, versions, both timings and the ratios. Goals: dual step / forward <= 1.15;
JAX images/s / torch images/s >= 1.0.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dualsig_jax import convert, models  # noqa: E402
from dualsig_jax.train import optim  # noqa: E402
from dualsig_jax.train.state import create_state, train_step  # noqa: E402


def _time(fn, iters):
  fn()  # compile / warm up
  fn()
  ts = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--arch', default='resnet50')
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--size', type=int, default=224)
  ap.add_argument('--iters', type=int, default=5)
  ap.add_argument('--num_classes', type=int, default=200)
  args = ap.parse_args()

  import torch

  sys.path.insert(0, os.path.join(ROOT, 'bench'))
  import torch_models  # PyTorch twins of our models (shared with the tests)

  rng = np.random.default_rng(0)
  x = rng.normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
  y = rng.integers(0, args.num_classes, size=args.batch).astype(np.int32)

  # Same weights on both sides: build in torch, convert.
  tmodel = torch_models.randomize_(torch_models.build_torch_model(args.arch, args.num_classes))
  tmodel.eval()
  sd = {k: v.detach().clone() for k, v in tmodel.state_dict().items()}
  variables = convert.torch_to_flax(sd, args.arch, num_classes=args.num_classes)
  model = models.build_model(args.arch, args.num_classes, frozen_backbone=True)
  o = ml_collections.ConfigDict(
    dict(
      lr=1e-3,
      lr_classifier_ratio=10.0,
      lr_decay_frequency=3,
      lr_decay_rate=0.1,
      momentum=0.9,
      nesterov=True,
      weight_decay=1e-4,
      lr_schedule='reference',
    )
  )
  tx, _, _ = optim.make_optimizer(
    variables['params'], arch=args.arch, stage='dual', optim_cfg=o, steps_per_epoch=100
  )
  state = create_state(jax.tree.map(jnp.asarray, variables), tx, 0)
  step = jax.jit(
    functools.partial(
      train_step,
      model=model,
      tx=tx,
      stage='dual',
      # The reference's dual stage: BatchNorm on batch statistics, running stats not kept.
      train_mode=True,
      keep_batch_stats=False,
      pos_weight=args.num_classes - 1.0,
      gamma=1.0,
      temp=1.0,
    ),
    donate_argnums=(0,),
  )
  fwd = jax.jit(lambda v, im: model.apply(v, im, train=False)['softmax_logits'])
  batch = {'image': jnp.asarray(x), 'label': jnp.asarray(y)}
  holder = {'s': state}

  def jax_step():
    holder['s'], m = step(holder['s'], batch)
    jax.block_until_ready(m['loss'])

  def jax_fwd():
    jax.block_until_ready(fwd(state_vars, batch['image']))

  state_vars = {
    'params': jax.tree.map(jnp.array, variables['params']),
    'batch_stats': jax.tree.map(jnp.array, variables['batch_stats']),
  }
  t_fwd = _time(jax_fwd, args.iters)
  t_step = _time(jax_step, args.iters)

  # The reference's step: frozen backbone, BatchNorm without running statistics, model.train().
  for name, p in tmodel.named_parameters():
    p.requires_grad = name.startswith(('fc2.', 'SPG_A4_2.'))
  for m in tmodel.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.track_running_stats = False
  tmodel.train()
  params = [p for p in tmodel.parameters() if p.requires_grad]
  topt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
  crit = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(args.num_classes - 1.0))
  ce = torch.nn.CrossEntropyLoss()
  tx_img = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  ty = torch.from_numpy(y.astype(np.int64))
  onehot = torch.nn.functional.one_hot(ty, args.num_classes).float()

  def torch_step():
    out = tmodel(tx_img)
    loss = crit(out['logits2'], onehot) + ce(out['logits'], ty).detach()
    topt.zero_grad()
    loss.backward()
    topt.step()

  t_torch = _time(torch_step, args.iters)

  print(
    f'machine: {platform.platform()}, {platform.processor() or platform.machine()}, '
    f'{os.cpu_count()} cpus; jax {jax.__version__} ({jax.devices()[0].platform}), '
    f'torch {torch.__version__} ({torch.get_num_threads()} threads)'
  )
  print(f'model {args.arch}, batch {args.batch} x {args.size}x{args.size}, median of {args.iters}')
  print('| measurement | seconds/batch | images/s |')
  print('|---|---|---|')
  for name, t in [
    ('JAX forward (eval)', t_fwd),
    ('JAX dual train step', t_step),
    ('torch dual train step (reference)', t_torch),
  ]:
    print(f'| {name} | {t:.4f} | {args.batch / t:.1f} |')
  print(f'ratio dual step / forward (goal <= 1.15): {t_step / t_fwd:.3f}')
  print(f'ratio JAX / torch images/s (goal >= 1.0): {t_torch / t_step:.2f}')


if __name__ == '__main__':
  main()
