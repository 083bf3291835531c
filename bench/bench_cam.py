"""Benchmark of dualsig_jax.cam (not a test).

(a) Overhead: time of maps for BOTH heads (forward + maps + resize + normalization, one jitted
    call of ``compute_cams_multi``) over a plain jitted forward of the same batch and model.
    Goals (issue 5): <= 1.05 for ``cam``, <= 1.3 for the gradient methods.
(b) Throughput: images/s against a pytorch-grad-cam-style computation of the same model with
    the same weights in torch on this machine: one forward, a backward per head for gradient
    methods, NumPy weights, then per image ``cv2.resize`` + normalization as the reference does.
    Goal >= 2x. The two sets of maps are also compared (max abs difference).
(c) ScoreCAM and AblationCAM: ``cam.explain`` (all masked forwards batched on device) against
    pytorch-grad-cam 1.5.7 itself on the torch twin with the same weights, target layer conv6,
    images/s and the ratio (goal >= 3x). ``--only-perturbation`` runs this part alone.

Usage: python bench/bench_cam.py [--arch vgg_tiny] [--batch 32] [--size 224] [--classes 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

# pytorch-grad-cam draws a tqdm bar per image in ScoreCAM / AblationCAM; not part of the work.
os.environ.setdefault('TQDM_DISABLE', '1')

import cv2  # noqa: E402
import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_models  # noqa: E402  (bench/torch_models.py: torch twins of our models)

from dualsig_jax import cam as C  # noqa: E402
from dualsig_jax import models  # noqa: E402


def _once(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def paired(fn_a, fn_b, reps):
  """Interleave a and b (the CPU is shared, so load drifts); returns (min a, min b,
  median of the per-pair ratios b / a)."""
  for f in (fn_a, fn_b, fn_a, fn_b):  # compile / warm up
    f()
  ta, tb = [], []
  for _ in range(reps):
    ta.append(_once(fn_a))
    tb.append(_once(fn_b))
  return min(ta), min(tb), float(np.median(np.asarray(tb) / np.asarray(ta)))


def copy_vgg_weights(variables, tmodel):
  """Flax vgg_* params -> the torch twin (conv HWIO -> OIHW, Dense [C,K] -> Linear [K,C])."""
  p = jax.tree_util.tree_map(np.asarray, variables['params'])
  sd = {}
  for i, d in p['features'].items():
    sd[f'features.{i}.weight'] = d['kernel'].transpose(3, 2, 0, 1)
    sd[f'features.{i}.bias'] = d['bias']
  sd['conv6.weight'] = p['conv6']['kernel'].transpose(3, 2, 0, 1)
  sd['conv6.bias'] = p['conv6']['bias']
  for n in ('fc', 'fc2'):
    sd[f'{n}.weight'] = p[n]['kernel'].T
    sd[f'{n}.bias'] = p[n]['bias']
  tmodel.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})


# ----------------------------------------------------------------------------- torch reference


def _np_weights(method, a, g):
  if method == 'gradcam':
    return g.mean(axis=(2, 3))
  if method == 'gradcam++':
    g2, g3 = g**2, g**3
    s = a.sum(axis=(2, 3))
    aij = np.where(g != 0, g2 / (2 * g2 + s[:, :, None, None] * g3 + 1e-6), 0)
    return (np.maximum(g, 0) * aij).sum(axis=(2, 3))
  s = a.sum(axis=(2, 3))  # xgradcam
  return (g * a / (s[:, :, None, None] + 1e-7)).sum(axis=(2, 3))


def _scale(cam, size=None):
  out = []
  for img in cam:
    img = img - img.min()
    img = img / (1e-7 + img.max())
    if size is not None:
      img = cv2.resize(img, size)
    out.append(img)
  return np.float32(out)


def _normalize(m):
  if np.isnan(m).any() or m.min() == m.max():
    return np.zeros_like(m)
  m = m - m.min()
  return m / m.max()


def torch_maps(tmodel, x, method, size):
  """pytorch-grad-cam + wsolevaluation style maps for both heads; returns {branch: [B,H,W]}."""
  h, w = size
  out = {}
  if method == 'cam':
    with torch.no_grad():
      r = tmodel(x)
      t = r['logits'].argmax(1)
      for b, name in (('softmax', 'fc'), ('sigmoid', 'fc2')):
        wt = getattr(tmodel, name).weight[t]
        if b == 'sigmoid':
          wt = wt.clamp(min=0)
        cams = (wt[:, :, None, None] * r['features']).mean(1).numpy()
        out[b] = np.stack(
          [_normalize(cv2.resize(c, (w, h), interpolation=cv2.INTER_CUBIC)) for c in cams]
        )
    return out
  r = tmodel(x)
  f = r['features']
  f.retain_grad()
  t = r['logits'].argmax(1)
  a = f.detach().numpy()
  for b, key in (('softmax', 'logits'), ('sigmoid', 'logits2')):
    tmodel.zero_grad()
    f.grad = None
    r[key].gather(1, t[:, None]).sum().backward(retain_graph=True)
    g = f.grad.numpy()
    if method == 'layercam':
      cam = (np.maximum(g, 0) * a).sum(1)
    else:
      wts = _np_weights(method, a, g)
      if b == 'sigmoid':
        wts = np.maximum(wts, 0)
      cam = (wts[:, :, None, None] * a).sum(1)
    cam = _scale(np.maximum(cam, 0), (w, h))
    cam = _scale(np.maximum(cam, 0))
    out[b] = np.stack(
      [_normalize(cv2.resize(c, (w, h), interpolation=cv2.INTER_CUBIC)) for c in cam]
    )
  return out


# ----------------------------------------------------------------------------- main


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--arch', default='vgg_tiny', choices=['vgg_tiny', 'vgg16'])
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--size', type=int, default=224)
  ap.add_argument('--classes', type=int, default=200)
  ap.add_argument('--reps', type=int, default=5)
  ap.add_argument('--pert-batch', type=int, default=2, help='(c): images per call')
  ap.add_argument('--pert-size', type=int, default=64, help='(c): image side')
  ap.add_argument('--pert-chunk', type=int, default=64, help='(c): forwards per chunk, both')
  ap.add_argument('--only-perturbation', action='store_true')
  ap.add_argument(
    '--run', default='', help='(c) on a trained run (workdir or checkpoint folder; load_run)'
  )
  ap.add_argument('--layer', default='', help='(c): target layer (default conv6; layer4 for a run)')
  args = ap.parse_args()

  print(
    f'machine: {platform.platform()} | {platform.processor() or platform.machine()} | '
    f'cpu_count={os.cpu_count()} | jax devices={jax.devices()}'
  )
  print(
    f'versions: python {platform.python_version()}, jax {jax.__version__}, '
    f'torch {torch.__version__} (threads={torch.get_num_threads()}), cv2 {cv2.__version__}, '
    f'numpy {np.__version__}'
  )
  print(
    f'model: {args.arch}, {args.classes} classes, batch {args.batch} x {args.size}^2, '
    f'median of {args.reps}'
  )

  if args.run:  # (c) on a trained model and its own evaluation images
    model, v, tmodel, images = _trained(args)
    perturbation_bench(args, model, v, tmodel, images)
    return
  model = models.build_model(args.arch, args.classes)
  v = models.init_variables(model, 0)
  rng = np.random.default_rng(0)
  # Make the sigmoid head differ from the softmax head (as after dual training).
  v['params']['fc2'] = dict(
    v['params']['fc2'],
    kernel=v['params']['fc']['kernel']
    + 0.01 * jnp.asarray(rng.standard_normal(v['params']['fc']['kernel'].shape), jnp.float32),
  )
  fns = models.cam_fns(model)
  images_np = rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
  images = jnp.asarray(images_np)
  x_t = torch.from_numpy(images_np.transpose(0, 3, 1, 2).copy())
  tmodel = torch_models.build_torch_model(args.arch, args.classes)
  copy_vgg_weights(v, tmodel)

  if args.only_perturbation:
    perturbation_bench(args, model, v, tmodel)
    return
  fwd = jax.jit(fns['apply_fn'])

  def jax_fwd():
    jax.block_until_ready(fwd(v, images))

  def torch_fwd():
    with torch.no_grad():
      tmodel(x_t)

  t_fwd, t_tfwd, _ = paired(jax_fwd, torch_fwd, args.reps)
  print(f'\nplain forward (min): jax {t_fwd * 1e3:.1f} ms, torch {t_tfwd * 1e3:.1f} ms')

  def jax_maps(methods):
    return C.compute_cams_multi(
      fns['apply_fn'],
      v,
      images,
      methods=methods,
      branches=C.BRANCHES,
      head_fn=fns['head_fn'],
      head_weights_fn=fns['head_weights_fn'],
    )

  # The added work alone (head + gradients + maps + resize + normalization, no backbone):
  # feed precomputed features as the "images" of an apply_fn that only runs the head. Small
  # and steady, so a less noise-prone estimate of the overhead than the paired ratio.
  feats = jax.block_until_ready(fwd(v, images)['features'])

  def head_only_apply(vv, f):
    return {'features': f, **fns['head_fn'](vv, f)}

  def added_only(methods):
    return C.compute_cams_multi(
      head_only_apply,
      v,
      feats,
      methods=methods,
      branches=C.BRANCHES,
      output_size=(args.size, args.size),
      head_fn=fns['head_fn'],
      head_weights_fn=fns['head_weights_fn'],
    )

  print('\n(a) maps for both heads / plain forward (jax)   (b) images/s jax vs torch-style')
  print(
    f'{"method":10s} {"jax ms":>8s} {"ratio":>6s} {"goal":>5s} | {"torch ms":>9s} '
    f'{"jax img/s":>9s} {"torch img/s":>11s} {"speedup":>7s} | max|diff| | added ms '
    f'(1 + added/fwd)'
  )
  for m in C.METHODS:
    _, t_j, ratio = paired(jax_fwd, lambda: jax.block_until_ready(jax_maps((m,))), args.reps)
    t_j2, t_t, _ = paired(
      lambda: jax.block_until_ready(jax_maps((m,))),
      lambda: torch_maps(tmodel, x_t, m, (args.size, args.size)),
      args.reps,
    )
    t_j = min(t_j, t_j2)
    jm, _ = jax_maps((m,))
    tm = torch_maps(tmodel, x_t, m, (args.size, args.size))
    diff = max(float(np.max(np.abs(np.asarray(jm[(m, b)]) - tm[b]))) for b in C.BRANCHES)
    goal = 1.05 if m == 'cam' else 1.3
    t_add, _, _ = paired(lambda: jax.block_until_ready(added_only((m,))), lambda: None, args.reps)
    print(
      f'{m:10s} {t_j * 1e3:8.1f} {ratio:6.2f} {goal:5.2f} | {t_t * 1e3:9.1f} '
      f'{args.batch / t_j:9.1f} {args.batch / t_t:11.1f} {t_t / t_j:7.2f} | {diff:.1e}'
      f'   | {t_add * 1e3:7.1f} ({1 + t_add / t_fwd:.3f})'
    )
  _, t_all, ratio = paired(jax_fwd, lambda: jax.block_until_ready(jax_maps(C.METHODS)), args.reps)
  print(
    f'{"all 5":10s} {t_all * 1e3:8.1f} {ratio:6.2f}   (all methods x both heads in one '
    f'call: {args.batch * 10 / t_all:.0f} maps/s)'
  )
  t_add, _, _ = paired(
    lambda: jax.block_until_ready(added_only(C.METHODS)), lambda: None, args.reps
  )
  print(
    f'{"":10s} added work alone: {t_add * 1e3:.1f} ms (1 + added/fwd = {1 + t_add / t_fwd:.3f})'
  )
  print('\nTimes are minima over reps; ratios are medians of interleaved (forward, maps) pairs.')
  perturbation_bench(args, model, v, tmodel)


def import_grad_cam():
  """pytorch_grad_cam 1.5.7; declares torchvision's nms/qnms schemas when its CUDA-built C++
  ops cannot load beside the CPU torch (the methods never call them)."""
  import importlib.util

  spec = importlib.util.find_spec('torchvision')
  try:
    torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), '_C.so'))
  except (OSError, RuntimeError):
    for op in ('nms', 'qnms'):
      try:
        getattr(torch.ops.torchvision, op)
      except (AttributeError, RuntimeError):
        lib = torch.library.Library('torchvision', 'FRAGMENT')
        lib.define(f'{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
        import_grad_cam.libs = [*getattr(import_grad_cam, 'libs', []), lib]  # keep alive
  import pytorch_grad_cam

  return pytorch_grad_cam


class _Logits(torch.nn.Module):
  """The torch twin's softmax-head logits as one tensor, as pytorch-grad-cam expects."""

  def __init__(self, m):
    super().__init__()
    self.m = m

  def forward(self, x):
    return self.m(x)['logits']


def _trained(args):
  """(model, variables, torch twin, images) of ``--run``: its first ``--pert-batch`` evaluation
  images at the run's size."""
  import scorecam_savings as S

  model, v, config = S.open_run(args.run)
  print(f'run: {args.run} ({config.model.arch}, {config.model.num_classes} classes)')
  images, _ = next(S.eval_batches(config, args.pert_batch))
  return model, v, S.torch_twin(v, config), images


def _old_vs_new_scorecam(model, v, x, layer, chunk, reps):
  """Seconds of ScoreCAM's channel weights, deduplicated vs one forward per channel, same jit."""
  from dualsig_jax.cam import perturbation as P
  from dualsig_jax.cam.target_layer import layer_forward

  forward, state = layer_forward(model, v, layer, call_kwargs={'train': False})

  def weights(fn):
    def run(st, xx):
      logits, acts = forward(st, xx, None)
      t = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      score = lambda out, rows: jnp.take_along_axis(out, t[rows][:, None], axis=1)[:, 0]  # noqa: E731
      return fn(lambda s_, y: forward(s_, y, None)[0], st, xx, acts, score, chunk)

    f = jax.jit(run)
    return lambda: jax.block_until_ready(f(state, x))

  new, old = weights(P.scorecam_weights), weights(P.scorecam_weights_all)
  diff = float(jnp.max(jnp.abs(new() - old())))
  acts = forward(state, x, None)[1]
  rep, const = P.scorecam_plan(acts)
  distinct = int(jnp.sum((rep == jnp.arange(rep.shape[1])) & ~const)) + 1
  return (*paired(new, old, reps), diff, distinct, int(rep.size))


def perturbation_bench(args, model, v, tmodel, x_np=None):
  gc = import_grad_cam()
  rng = np.random.default_rng(1)
  b, s = args.pert_batch, args.pert_size
  if x_np is None:
    x_np = rng.standard_normal((b, s, s, 3)).astype(np.float32)
  b, s = x_np.shape[:2]
  x, x_t = jnp.asarray(x_np), torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
  wrapped = _Logits(tmodel).eval()
  layer = args.layer or ('layer4' if args.run else 'conv6')
  t_layer = getattr(tmodel, layer)
  print(
    f'\n(c) perturbation methods at {layer}: {b} images x {s}^2, chunks of {args.pert_chunk}, '
    f'min of {args.reps}'
  )
  print(
    f'{"method":12s} {"jax s":>8s} {"torch s":>8s} {"jax img/s":>10s} {"torch img/s":>11s} '
    f'{"ratio":>6s} | max|diff|'
  )
  for name, cls in (('scorecam', gc.ScoreCAM), ('ablationcam', gc.AblationCAM)):
    cam = cls(wrapped, [t_layer])
    cam.batch_size = args.pert_chunk

    def run_jax(name=name):
      return jax.block_until_ready(
        C.explain(model, v, x, layer, (name,), batch_size=args.pert_chunk, train=False)
      )

    def run_torch(cam=cam):
      return cam(input_tensor=x_t, targets=None)

    t_j, t_t, _ = paired(run_jax, run_torch, args.reps)
    diff = float(np.max(np.abs(np.asarray(run_jax()[0][name]) - run_torch())))
    print(
      f'{name:12s} {t_j:8.3f} {t_t:8.3f} {b / t_j:10.2f} {b / t_t:11.2f} {t_t / t_j:6.2f} | '
      f'{diff:.1e}'
    )
  t_new, t_old, ratio, diff, distinct, pairs = _old_vs_new_scorecam(
    model, v, x, layer, args.pert_chunk, args.reps
  )
  print(
    f'ScoreCAM weights, ours deduplicated vs ours one forward per channel (same jit): '
    f'{t_new:.3f} s vs {t_old:.3f} s, ratio {ratio:.2f} (median of pairs); {distinct} forwards '
    f'instead of {pairs} (the zero image included); max|diff| {diff:.1e}'
  )
  print(
    'AblationCAM at a layer without zeros (conv6 is before its ReLU): the package lowers the '
    'ablation value by 1e7 per channel already ablated in a batch, explain does not.'
  )


if __name__ == '__main__':
  main()
