"""How close a JAX evaluation comes to a PyTorch one of the same checkpoint (not a test).

Takes a finished run's dual-branch checkpoint (default: the synthetic main job's
`runs/synthetic`), and evaluates it twice on the whole test split with plain CAM for both heads:
- JAX: `dualsig_jax.evaluate.evaluate` (what eval.py runs);
- PyTorch, the reference's way: the weights exported with `convert.flax_to_torch` into the torch
  twin of the reference's model class (`bench/torch_models.py`), images read with PIL, resized
  (bilinear) and normalised as torchvision's Resize / ToTensor / Normalize do, CAM as
  wsolevaluation's `return_cam` (negative weights clamped for the sigmoid head), cv2 INTER_CUBIC
  resize and min-max normalisation per map, and the metrics by the literal per-threshold port
  of wsolevaluation (`bench/wsol_reference.py`). Boxes and masks come from the split's metadata
  (read by the project's loader; its parity with the reference is tested in tests/).

Prints the largest map difference and, per head and metric, both numbers and the difference in
points.

Usage: python bench/bench_torch_agreement.py [--workdir runs/synthetic] [--config configs/synthetic.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile

import cv2
import jax
import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import torch_models  # noqa: E402
import wsol_reference as ref  # noqa: E402

from dualsig_jax import convert, data, evaluate, vocab  # noqa: E402
from dualsig_jax.train import stage as stage_lib  # noqa: E402


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  mod_spec = importlib.util.spec_from_file_location('_config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def reference_image(path: str, size: int) -> np.ndarray:
  """torchvision's Resize((S, S)) + ToTensor + Normalize on a PIL image, [3, S, S] float32."""
  img = Image.open(path).convert('RGB').resize((size, size), Image.BILINEAR)
  x = np.asarray(img, np.float32) / 255.0
  x = (x - np.asarray(vocab.IMAGENET_MEAN, np.float32)) / np.asarray(vocab.IMAGENET_STD, np.float32)
  return x.transpose(2, 0, 1)


def reference_scoremap(cam: np.ndarray, size: int) -> np.ndarray:
  """wsolevaluation: cv2.resize INTER_CUBIC, then normalize_scoremap (constant / NaN -> 0)."""
  m = cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
  if np.isnan(m).any() or m.min() == m.max():
    return np.zeros_like(m)
  m = m - m.min()
  return m / m.max()


def torch_side(config, variables, loader, interval):
  c = config.model
  model = torch_models.build_torch_model(
    c.arch, c.num_classes, family=c.family, large_feature_map=c.large_feature_map
  )
  sd = convert.flax_to_torch(variables, c.arch)
  model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()})
  model.eval()
  e, size = config.eval, config.input.eval_size
  thr = list(np.arange(0, 1, interval))
  box = {
    b: ref.RefBoxEvaluator(e.iou_threshold_list, interval, e.multi_contour_eval)
    for b in vocab.BRANCHES
  }
  maps = {b: {} for b in vocab.BRANCHES}
  masks, correct, n = {}, 0, 0
  for batch in loader:
    idx = np.flatnonzero(np.asarray(batch['valid'], bool))
    ids = [loader.metadata.image_ids[int(batch['index'][i])] for i in idx]
    x = np.stack([reference_image(os.path.join(config.input.data_root, i), size) for i in ids])
    labels = np.asarray(batch['label'])[idx]
    with torch.no_grad():
      out = model(torch.from_numpy(x))
    feats = out['features'].numpy()
    pred = out['logits'].argmax(1).numpy()
    correct += int((pred == labels).sum())
    n += len(idx)
    for b, head in (('softmax', model.fc), ('sigmoid', model.fc2)):
      w = head.weight.detach().numpy()[labels]
      if b == 'sigmoid':
        w = np.maximum(w, 0)
      cams = (w[:, :, None, None] * feats).mean(1)
      for j, i in enumerate(idx):
        m = reference_scoremap(cams[j], size)
        maps[b][ids[j]] = m
        gt = np.asarray(batch['boxes'][i, : batch['num_boxes'][i]])
        box[b].accumulate(ref.ref_image_ious(m, gt, thr), pred[j] == labels[j])
    for j, i in enumerate(idx):
      masks[ids[j]] = np.asarray(batch['mask'][i])
  results = {'top1_cls': 100.0 * correct / n, 'num_images': n}
  for b in vocab.BRANCHES:
    r = box[b].compute()
    order = list(maps[b])
    results[b] = dict(
      top1_loc=r['top1_loc']['50'],
      gt_known_loc=r['gt_known_loc']['50'],
      maxboxacc_v2=r['maxboxacc_v2'],
      pxap=ref.ref_pxap([maps[b][k] for k in order], [masks[k] for k in order], interval),
    )
  return results, maps


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', default=os.path.join(ROOT, 'runs', 'synthetic'))
  p.add_argument('--config', default='configs/synthetic.py')
  a = p.parse_args()
  config = load_config(a.config)
  config.unlock()
  config.eval.methods = ('cam',)
  config.eval.save_scoremaps = True
  config.eval.num_plot_images = 0
  config.lock()
  variables = jax.device_get(stage_lib.load_dual_variables(config, a.workdir))
  with tempfile.TemporaryDirectory() as out:
    ours = evaluate.evaluate(config, out, variables=variables)
    loader = data.make_eval_loader(config.input, config.input.eval_split, batch_size=32)
    theirs, torch_maps = torch_side(config, variables, loader, config.eval.cam_curve_interval)
    worst = 0.0
    for b in vocab.BRANCHES:
      for image_id, m in torch_maps[b].items():
        got = np.load(os.path.join(out, 'scoremaps', f'cam_{b}', image_id + '.npy'))
        worst = max(worst, float(np.abs(got - m).max()))
  print(
    f'machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}, '
    f'jax {jax.__version__}, torch {torch.__version__}, opencv {cv2.__version__}'
  )
  print(
    f'{a.workdir}: {config.model.arch} ({config.model.family}), split '
    f'{config.input.eval_split} ({theirs["num_images"]} images), CAM, interval '
    f'{config.eval.cam_curve_interval}'
  )
  print(f'largest |score map difference|, both heads: {worst:.2e}')
  print('| head | metric | JAX (eval.py) | PyTorch (reference path) | JAX − PyTorch (points) |')
  print('|---|---|---|---|---|')
  cls = ours['classification']['softmax_top1']
  print(
    f'| softmax | Top-1 Cls | {cls:.2f} | {theirs["top1_cls"]:.2f} | '
    f'{cls - theirs["top1_cls"]:+.2f} |'
  )
  for b in vocab.BRANCHES:
    for k in ('top1_loc', 'gt_known_loc', 'maxboxacc_v2', 'pxap'):
      x, y = ours['methods']['cam'][b][k], theirs[b][k]
      print(f'| {b} | {k} | {x:.2f} | {y:.2f} | {x - y:+.2f} |')


if __name__ == '__main__':
  main()
