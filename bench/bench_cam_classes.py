"""Benchmark (not a test): maps for every class in one ``cam.explain`` call against a Python
loop over the classes, same model, same methods.

One call with ``targets='all'`` shares the forward (and ScoreCAM's masked forwards) across the
classes and vmaps one VJP per class; the loop runs ``K`` jitted calls, each with its own
forward. Prints the machine, versions, both times, the ratio for K = 10 and K = 200, and the
maps per second of the one call for an ImageNet-size head (K = 1000).

Usage: python bench/bench_cam_classes.py [--batch 4] [--size 32] [--methods gradcam]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dualsig_jax.cam import explain


class Net(nn.Module):
  """A small CNN with a GAP + Dense head of ``num_classes``."""

  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3), name='conv1')(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(64, (3, 3), name='conv2')(x))
    x = nn.relu(nn.Conv(64, (3, 3), name='conv3')(x))
    return nn.Dense(self.num_classes, name='fc')(x.mean(axis=(1, 2)))


def timed(fn, reps):
  fn()  # compile / warm up
  best = float('inf')
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return best


def compare(k, args, methods):
  net = Net(k)
  x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
  v = net.init(jax.random.key(1), x)

  def one_call():
    return explain(net, v, x, 'conv3', methods, 'all', batch_size=args.batch * 16)[0]

  def loop():
    return [
      explain(net, v, x, 'conv3', methods, [c] * args.batch, batch_size=args.batch * 16)[0]
      for c in range(k)
    ]

  all_maps = one_call()
  loop_maps = loop()
  worst = max(
    float(jnp.abs(all_maps[m][:, c] - loop_maps[c][m]).max()) for m in methods for c in range(k)
  )
  t_all, t_loop = timed(one_call, args.reps), timed(loop, args.reps)
  return t_all, t_loop, worst


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--batch', type=int, default=4)
  ap.add_argument('--size', type=int, default=32)
  ap.add_argument('--reps', type=int, default=3)
  ap.add_argument('--methods', default='gradcam')
  args = ap.parse_args()
  methods = tuple(args.methods.split(','))
  print(f'machine: {platform.machine()} {platform.processor() or ""} {os.cpu_count()} cores')
  print(f'jax {jax.__version__} ({jax.devices()[0].platform}), flax {flax.__version__}')
  print(f'batch {args.batch}, {args.size}x{args.size}, methods {methods}, best of {args.reps}')
  for k in (10, 200):
    t_all, t_loop, worst = compare(k, args, methods)
    print(
      f'K={k:4d}: targets="all" {t_all * 1e3:8.1f} ms   loop over classes {t_loop * 1e3:8.1f} ms'
      f'   ratio {t_loop / t_all:6.1f}x   (worst map difference {worst:.1e})'
    )
  net = Net(1000)
  x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
  v = net.init(jax.random.key(1), x)
  t = timed(lambda: explain(net, v, x, 'conv3', methods, 'all')[0], args.reps)
  print(f'K=1000 (ImageNet-size head): {args.batch * 1000 / t:,.0f} maps/s ({t * 1e3:.1f} ms)')


if __name__ == '__main__':
  np.set_printoptions(precision=3)
  main()
