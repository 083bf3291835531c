"""How often ScoreCAM's exact savings occur on a trained run (not a test).

For each image of a split, at a target layer: the share of (image, channel) pairs whose map is
constant (one shared forward of the zero image), the share that repeats an earlier channel of the
same image (its score is reused), and so the forwards ``cam.explain`` runs against one per pair.

    python bench/scorecam_savings.py --run runs/synthetic --layers layer1,layer2,layer3,layer4

Also the helpers ``bench_cam.py --run`` uses: a trained run's model, its torch twin with the
same weights, and a batch of its evaluation images.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dualsig_jax import data, runs  # noqa: E402
from dualsig_jax.cam.perturbation import scorecam_plan  # noqa: E402
from dualsig_jax.cam.target_layer import layer_forward  # noqa: E402


def open_run(path: str):
  """(model, variables, config) of a trained run (runs.load_run)."""
  model, variables = runs.load_run(path)
  return model, variables, runs.config_of_run(path)


def torch_twin(variables, config):
  """The torch model of the run's arch with the same weights (eval mode)."""
  import torch
  import torch_models

  from dualsig_jax.convert.layouts import flax_to_torch

  m = config.model
  tmodel = torch_models.build_torch_model(
    m.arch, m.num_classes, family=m.family, large_feature_map=m.large_feature_map
  )
  sd = flax_to_torch(variables, m.arch, family=m.family, as_numpy=True)
  tmodel.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
  return tmodel.eval()


def eval_batches(config, batch_size: int, split: str | None = None):
  """The run's evaluation images, ``[batch_size, S, S, 3]`` float32 batches (as eval.py reads
  them), with the labels."""
  loader = data.make_eval_loader(
    config.input,
    split or config.input.eval_split,
    batch_size=batch_size,
    process_index=0,
    process_count=1,
    num_classes=config.model.num_classes,
  )
  for batch in loader:
    yield np.asarray(batch['image'], np.float32), np.asarray(batch['label'])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--run', required=True, help='a workdir or checkpoint folder (load_run)')
  ap.add_argument('--layers', default='layer1,layer2,layer3,layer4')
  ap.add_argument('--batch', type=int, default=50)
  ap.add_argument('--max-images', type=int, default=0, help='0: the whole split')
  args = ap.parse_args()
  print(f'machine: {platform.platform()} | cpu_count={os.cpu_count()} | jax {jax.__version__}')
  model, variables, config = open_run(args.run)
  print(f'run: {args.run} ({config.model.arch}, {config.model.num_classes} classes)')
  t0 = time.perf_counter()
  for layer in args.layers.split(','):
    forward, state = layer_forward(model, variables, layer, call_kwargs={'train': False})
    plan = jax.jit(lambda s, x, f=forward: scorecam_plan(f(s, x, None)[1]))
    n = const = rep = calls = 0
    channels = None
    for images, _ in eval_batches(config, args.batch):
      r, c = plan(state, jnp.asarray(images))
      r, c = np.asarray(r), np.asarray(c)
      channels = r.shape[1]
      calls += 1
      n += r.size
      const += int(c.sum())
      rep += int(((r != np.arange(channels)) & ~c).sum())
      if args.max_images and n // channels >= args.max_images:
        break
    images_seen = n // channels
    forwards = n - const - rep + calls  # + the zero image, once per call
    print(
      f'{layer}: {images_seen} images x {channels} channels: constant {const / n:.1%}, '
      f'repeated {rep / n:.1%}; forwards {forwards} of {n} in {calls} calls of {args.batch} ({n / forwards:.2f}x fewer)'
    )
  print(f'({time.perf_counter() - t0:.0f} s)')


if __name__ == '__main__':
  main()
