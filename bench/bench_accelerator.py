"""Benchmark: JAX (this library) vs PyTorch on one device, the same models, weights and batch.

For each model (default ResNet50-CAM and VGG16-CAM, 224 px, global batch 64, 1000 classes)
and compute precision (float32; bfloat16 via ``build_model(dtype=bfloat16)`` and
``torch.autocast``), images/s of:

* ``vanilla_step``: the vanilla stage's train step (everything but ``fc2`` trains, softmax CE,
  BatchNorm on batch statistics with running averages kept).
* ``dual_step``: the paper's stage (frozen backbone whose BatchNorm uses batch statistics and
  whose running-stat updates are dropped, only ``fc2`` trains, balanced BCE + logged CE).
* ``cam`` / ``gradcam``: maps of both heads (softmax and sigmoid), resized to the input size
  and min-max normalised; JAX via ``dualsig_jax.cam.compute_cams_multi``, torch as one forward
  plus a weighted channel sum (CAM) or autograd w.r.t. the feature map (Grad-CAM).

PyTorch runs eagerly (as the reference does): SGD(momentum 0.9, Nesterov), BCEWithLogitsLoss
with ``pos_weight = K - 1``, ``requires_grad=False`` on frozen parameters, ``model.train()``;
on CUDA with channels-last tensors, cuDNN autotuning and TF32 allowed (JAX's GPU default).
The first call (JAX: trace + compile + run; torch: autotuning) is timed apart and kept out
of the throughput, which is the median over ``--repeats`` of ``--steps`` back-to-back calls
with one device sync at the end.

    python bench/bench_accelerator.py [--models resnet50,vgg16 --size 224 --batch 64]
    python bench/bench_accelerator.py --toy --out /tmp/acc.json   # CPU smoke size

Prints the device, versions and a Markdown table; ``--out`` writes the same as JSON (rewritten
after every row with ``complete: false``, so a run cut short still leaves its rows).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
import types
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WHATS = ('vanilla_step', 'dual_step', 'cam', 'gradcam')
PRECISIONS = ('float32', 'bfloat16')
# --toy: tiny models at smoke size, so the whole grid runs on a CPU in well under a minute.
TOY = dict(models='resnet_tiny,vgg_tiny', size=64, batch=8, steps=2, repeats=1, num_classes=10)
FULL = dict(models='resnet50,vgg16', size=224, batch=64, steps=10, repeats=3, num_classes=1000)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--toy', action='store_true', help=f'smoke preset: {TOY}')
  p.add_argument('--models', help=f'comma separated archs (default {FULL["models"]})')
  p.add_argument('--size', type=int, help='image side in pixels (default 224)')
  p.add_argument('--batch', type=int, help='global batch (default 64)')
  p.add_argument('--steps', type=int, help='timed calls per repeat (default 10)')
  p.add_argument('--repeats', type=int, help='timed repeats, median reported (default 3)')
  p.add_argument('--num_classes', type=int, help='classes (default 1000)')
  p.add_argument('--precisions', default=','.join(PRECISIONS))
  p.add_argument('--whats', default=','.join(WHATS), help=f'subset of {",".join(WHATS)}')
  p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'gpu'))
  p.add_argument('--out', help='write the results as JSON here')
  args = p.parse_args(argv)
  for key, value in (TOY if args.toy else FULL).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.models = [m for m in args.models.split(',') if m]
  args.precisions = [m for m in args.precisions.split(',') if m]
  args.whats = [m for m in args.whats.split(',') if m]
  for name, values, valid in (
    ('precision', args.precisions, PRECISIONS),
    ('what', args.whats, WHATS),
  ):
    bad = [v for v in values if v not in valid]
    if bad:
      raise SystemExit(f'unknown {name} {bad}; valid: {", ".join(valid)}')
  for name in ('size', 'batch', 'steps', 'repeats', 'num_classes'):
    if getattr(args, name) < 1:
      raise SystemExit(f'--{name} must be >= 1, got {getattr(args, name)}')
  return args


def measure(call, sync, *, steps: int, repeats: int, batch: int) -> tuple[float, float]:
  """-> (first call seconds, median images/s of ``repeats`` x ``steps`` timed calls).

  ``call()`` runs one step and returns what ``sync`` blocks on. A second untimed call follows
  the first, so lazy work of either framework (autotuning, allocator growth) is not timed.
  """
  t0 = time.perf_counter()
  sync(call())
  first = time.perf_counter() - t0
  sync(call())
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      out = call()
    sync(out)
    rates.append(batch * steps / (time.perf_counter() - t0))
  return first, statistics.median(rates)


class Bench:
  """Holds one model's shared weights and batch; ``jax_*`` / ``torch_*`` return callables."""

  def __init__(self, args, arch: str, env):
    self.args, self.arch, self.env = args, arch, env
    jnp, np, torch = env.jnp, env.np, env.torch
    k = args.num_classes
    # Weights: the library's init (fc2 cloned from fc, as the dual stage starts), copied into
    # the torch mirror with the project's converter, so both frameworks run the same network.
    model = self.build(jnp.float32, frozen=False)
    self.variables = env.models.clone_head(env.models.init_variables(model, 0))
    self.torch_state = env.convert.flax_to_torch(self.variables, arch)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    y = rng.integers(0, k, size=args.batch).astype(np.int32)
    self.batch = {'image': jnp.asarray(x), 'label': jnp.asarray(y)}
    dev = env.torch_device
    fmt = torch.channels_last if dev.type == 'cuda' else torch.contiguous_format
    self.tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev, memory_format=fmt)
    self.ty = torch.from_numpy(y.astype(np.int64)).to(dev)
    self.memory_format = fmt

  # ---------------------------------------------------------------------------------- JAX
  def build(self, dtype, *, frozen: bool):
    return self.env.models.build_model(
      self.arch, self.args.num_classes, frozen_backbone=frozen, dtype=dtype
    )

  def jax_step(self, dtype, stage: str):
    jax, jnp, state_lib = self.env.jax, self.env.jnp, self.env.state_lib
    model = self.build(dtype, frozen=stage == 'dual')
    # The stage's default optimizer section (SGD-Nesterov, weight decay, lr groups).
    cfg = self.env.defaults.base_config()[stage]
    tx, _, _ = self.env.optim.make_optimizer(
      self.variables['params'], arch=self.arch, stage=stage, optim_cfg=cfg, steps_per_epoch=100
    )
    kwargs = dict(
      model=model,
      tx=tx,
      stage=stage,
      train_mode=True,
      keep_batch_stats=stage == 'vanilla',
      pos_weight=self.args.num_classes - 1.0,
      gamma=1.0,
      temp=1.0,
    )
    step = jax.jit(functools.partial(state_lib.train_step, **kwargs), donate_argnums=(0,))
    # A copy: the step donates (frees) its input state, the shared variables must survive.
    holder = [state_lib.create_state(jax.tree.map(jnp.array, self.variables), tx, 0)]

    def call():
      holder[0], metrics = step(holder[0], self.batch)
      return metrics['loss']

    return call

  def jax_cam(self, dtype, method: str):
    env = self.env
    fns = env.models.cam_fns(self.build(dtype, frozen=True))
    variables = self.variables
    images = self.batch['image']

    def call():
      return env.cam.compute_cams_multi(
        fns['apply_fn'],
        variables,
        images,
        methods=(method,),
        branches=('softmax', 'sigmoid'),
        head_fn=fns['head_fn'],
        head_weights_fn=fns['head_weights_fn'],
      )

    return call

  # -------------------------------------------------------------------------------- torch
  def torch_model(self):
    model = self.env.torch_models.build_torch_cam_model(self.arch, self.args.num_classes)
    model.load_state_dict(self.torch_state, strict=True)
    return model.to(self.env.torch_device, memory_format=self.memory_format)

  def autocast(self, precision: str):
    """A context-manager factory: bfloat16 autocast, or a no-op for float32."""
    torch = self.env.torch
    return lambda: torch.autocast(
      self.env.torch_device.type, dtype=torch.bfloat16, enabled=precision == 'bfloat16'
    )

  def torch_step(self, precision: str, stage: str):
    return self.env.torch_models.train_step_fn(
      self.torch_model(),
      self.tx,
      self.ty,
      stage=stage,
      num_classes=self.args.num_classes,
      autocast=self.autocast(precision),
    )

  def torch_cam(self, precision: str, method: str):
    return self.env.torch_models.cam_fn(
      self.torch_model(), self.tx, method=method, autocast=self.autocast(precision)
    )

  def parity(self) -> float:
    """max |JAX - torch| / max |torch| of float32 eval-mode softmax logits (same weights)."""
    np, torch = self.env.np, self.env.torch
    model = self.build(self.env.jnp.float32, frozen=True)
    forward = self.env.jax.jit(lambda v, x: model.apply(v, x, train=False)['softmax_logits'])
    ours = np.asarray(forward(self.variables, self.batch['image']))
    with torch.no_grad():
      theirs = self.torch_model().eval()(self.tx)['logits'].float().cpu().numpy()
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def load_env(device: str) -> types.SimpleNamespace:
  """Imports both frameworks on one device; ``device``: 'auto' | 'cpu' | 'gpu'."""
  if device == 'cpu':
    os.environ['JAX_PLATFORMS'] = 'cpu'
  # Both frameworks share one accelerator: keep JAX from reserving 75% of its memory.
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.45')
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  sys.path[:0] = [ROOT, HERE]
  import torch_steps

  from dualsig_jax import cam, convert, defaults, models
  from dualsig_jax.train import optim
  from dualsig_jax.train import state as state_lib

  backend = jax.default_backend()
  if device == 'gpu' and backend != 'gpu':
    raise SystemExit(f'--device gpu but JAX runs on {backend!r}')
  if backend == 'gpu':
    if not torch.cuda.is_available():
      raise SystemExit('JAX runs on the GPU but torch sees no CUDA device: not the same device')
    torch_device = torch.device('cuda')
    torch.backends.cudnn.benchmark = True
    # JAX's default float32 matmul/conv precision on GPU allows TF32; give torch the same.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  else:
    torch_device = torch.device('cpu')
  return types.SimpleNamespace(
    jax=jax,
    jnp=jnp,
    np=np,
    torch=torch,
    torch_models=torch_steps,
    cam=cam,
    convert=convert,
    defaults=defaults,
    models=models,
    optim=optim,
    state_lib=state_lib,
    torch_device=torch_device,
  )


def describe(env) -> dict:
  import flax
  import jaxlib
  import optax

  jax, torch = env.jax, env.torch
  if env.torch_device.type == 'cuda':
    torch_dev = torch.cuda.get_device_name(0)
  else:
    torch_dev = f'cpu ({torch.get_num_threads()} threads)'
  return {
    'jax_device': f'{jax.devices()[0].platform}: {jax.devices()[0].device_kind}',
    'torch_device': torch_dev,
    'versions': {
      'python': platform.python_version(),
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'flax': flax.__version__,
      'optax': optax.__version__,
      'torch': torch.__version__,
      'cuda (torch)': torch.version.cuda,
      'numpy': env.np.__version__,
    },
    'machine': f'{platform.platform()}, {platform.processor() or platform.machine()}, '
    f'{os.cpu_count()} CPUs',
  }


def run(args) -> dict:
  env = load_env(args.device)
  warnings.filterwarnings('ignore', message='.*donated buffers were not usable.*')
  jnp, torch = env.jnp, env.torch
  cuda = env.torch_device.type == 'cuda'

  def torch_sync(_):
    if cuda:
      torch.cuda.synchronize()

  timing = dict(steps=args.steps, repeats=args.repeats, batch=args.batch)
  settings = {k: getattr(args, k) for k in ('size', 'batch', 'steps', 'repeats', 'num_classes')}
  header = dict(describe(env), settings=settings)
  rows, parity = [], {}
  for arch in args.models:
    bench = Bench(args, arch, env)
    parity[arch] = bench.parity()
    for precision in args.precisions:
      dtype = jnp.float32 if precision == 'float32' else jnp.bfloat16
      for what in args.whats:
        if what.endswith('_step'):
          stage = what.split('_')[0]
          jax_call, torch_call = bench.jax_step(dtype, stage), bench.torch_step(precision, stage)
        else:
          jax_call, torch_call = bench.jax_cam(dtype, what), bench.torch_cam(precision, what)
        j_first, j_rate = measure(jax_call, env.jax.block_until_ready, **timing)
        del jax_call
        t_first, t_rate = measure(torch_call, torch_sync, **timing)
        del torch_call
        if cuda:
          torch.cuda.empty_cache()
        row = dict(
          model=arch,
          precision=precision,
          what=what,
          jax_img_s=j_rate,
          torch_img_s=t_rate,
          ratio=j_rate / t_rate,
          jax_first_call_s=j_first,
          torch_first_call_s=t_first,
        )
        rows.append(row)
        print(
          f'  {arch} {precision} {what}: jax {j_rate:.1f} img/s, torch {t_rate:.1f} img/s',
          flush=True,
        )
        # Rows so far, in case a time-limited accelerator session ends the run early.
        write_json(args.out, dict(header, parity_rel_max_diff=parity, rows=rows, complete=False))
  return dict(header, parity_rel_max_diff=parity, rows=rows, complete=True)


def write_json(path: str | None, result: dict) -> None:
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(result, f, indent=2)


def table(result: dict) -> str:
  lines = [
    '| model | precision | what | JAX img/s | torch img/s | JAX/torch | JAX first call s '
    '| torch first call s |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r in result['rows']:
    lines.append(
      f'| {r["model"]} | {r["precision"]} | {r["what"]} | {r["jax_img_s"]:.1f} '
      f'| {r["torch_img_s"]:.1f} | {r["ratio"]:.2f} | {r["jax_first_call_s"]:.2f} '
      f'| {r["torch_first_call_s"]:.2f} |'
    )
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  result = run(args)
  print(f'JAX device: {result["jax_device"]}; torch device: {result["torch_device"]}')
  print('versions: ' + ', '.join(f'{k} {v}' for k, v in result['versions'].items()))
  print(f'machine: {result["machine"]}')
  s = result['settings']
  print(
    f'batch {s["batch"]} x {s["size"]}x{s["size"]}, {s["num_classes"]} classes; img/s = median '
    f'of {s["repeats"]} x {s["steps"]} calls; float32 logits parity (max rel diff): '
    + ', '.join(f'{k} {v:.1e}' for k, v in result['parity_rel_max_diff'].items())
  )
  print(table(result))
  numbers = ('jax_img_s', 'torch_img_s', 'ratio', 'jax_first_call_s', 'torch_first_call_s')
  bad = [r for r in result['rows'] if not all(math.isfinite(r[k]) for k in numbers)]
  if bad:
    print(f'warning: non-finite numbers in {bad}')
  write_json(args.out, result)
  return result


if __name__ == '__main__':
  main()
