"""Evaluation of a trained dual-branch model: classification, WSOL localization and fidelity.

For every configured CAM method and both heads (baseline = softmax head, ours = sigmoid head):
maps of the ground-truth class feed the box / mask evaluators (as the reference: Top-1 Loc also
needs a correct softmax prediction), maps of the predicted class k* feed Average Drop and
Increase in Confidence. Writes results.json, results.md and plots into the workdir.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from dualsig_jax import cam, data, defaults, models, wsol
from dualsig_jax.train import loop, sharding
from dualsig_jax.wsol import plots as wsol_plots

log = logging.getLogger('dualsig_jax')
BRANCHES = ('softmax', 'sigmoid')


def _vanilla_variables(config, workdir):
  src = loop.vanilla_source(config, workdir)
  if not os.path.isdir(src):
    return None
  return loop.latest_variables(src)


class _Fidelity:
  """Streaming sums of Average Drop / Increase in Confidence over valid images."""

  def __init__(self):
    self.drop = 0.0
    self.inc = 0.0
    self.n = 0

  def accumulate(self, change: dict, valid: np.ndarray) -> None:
    self.drop += float(np.sum(np.asarray(change['drop'])[valid]))
    self.inc += float(np.sum(np.asarray(change['increase'])[valid]))
    self.n += int(valid.sum())

  def compute(self) -> dict:
    n = max(self.n, 1)
    return {'avg_drop': 100.0 * self.drop / n, 'inc_conf': 100.0 * self.inc / n}


def _loc_summary(box: dict | None, mask: dict | None) -> dict:
  out = {}
  if box is not None:
    # Table 2 of the paper: Top-1 / GT-known Loc at IoU 50 and the loc threshold.
    out.update(
      top1_loc=box['top1_loc']['50'],
      gt_known_loc=box['gt_known_loc']['50'],
      maxboxacc_v2=box['maxboxacc_v2'],
      maxboxacc=box['maxboxacc'],
      maxboxacc_v1=box['maxboxacc_v1'],
    )
  if mask is not None:
    out['pxap'] = mask['pxap']
  return out


def evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  variables: dict | None = None,
  split: str | None = None,
) -> dict:
  """Evaluates the newest `dual` checkpoint of `workdir` (or `variables`) on `split`.

  Returns:
    The results dict also written to `<workdir>/results.json`.
  """
  defaults.validate(config)
  split = split or config.input.eval_split
  mesh = sharding.make_mesh()
  ndev = mesh.devices.size
  if config.eval.batch_size % ndev:
    raise ValueError(
      f'eval.batch_size={config.eval.batch_size} is not divisible by the {ndev} devices'
    )
  model = loop.build_stage_model(config, 'dual')
  if variables is None:
    variables = loop.latest_variables(workdir, 'dual')
  variables = jax.device_put(variables, sharding.replicated(mesh))
  fns = models.cam_fns(model)
  loader = data.make_eval_loader(config.input, split, batch_size=config.eval.batch_size)
  meta = loader.metadata
  has_boxes = bool(meta.boxes)
  has_masks = bool(meta.masks)
  e = config.eval
  methods = tuple(e.methods)
  keys = [(m, b) for m in methods for b in BRANCHES]
  box_ev = (
    {
      k: wsol.BoxEvaluator(
        iou_threshold_list=tuple(e.iou_threshold_list),
        cam_curve_interval=e.cam_curve_interval,
        multi_contour_eval=e.multi_contour_eval,
        loc_threshold=e.loc_threshold,
      )
      for k in keys
    }
    if has_boxes
    else {}
  )
  mask_ev = (
    {k: wsol.MaskEvaluator(cam_curve_interval=e.cam_curve_interval) for k in keys}
    if has_masks
    else {}
  )
  fid = {k: _Fidelity() for k in keys}
  correct = {'softmax': 0, 'sigmoid': 0}
  n_images = 0
  plot_store = {'image': [], 'boxes': [], 'maps': {k: [] for k in keys}, 'title': []}
  size = (config.input.eval_size, config.input.eval_size)
  data_sharding = sharding.data_sharded(mesh)
  predict = jax.jit(lambda v, x: fns['apply_fn'](v, x))
  score_dir = os.path.join(workdir, 'scoremaps')

  n_batches = len(loader)
  if e.max_batches > 0:
    n_batches = min(n_batches, e.max_batches)
  bar = tqdm(total=n_batches, desc='eval', disable=jax.process_index() != 0, dynamic_ncols=True)
  for bi, batch in enumerate(loader):
    if bi >= n_batches:
      break
    images = jax.device_put(jnp.asarray(batch['image']), data_sharding)
    labels = np.asarray(batch['label'])
    valid = np.asarray(batch['valid'], bool)
    out = predict(variables, images)
    preds = {b: np.asarray(out[f'{b}_logits']).argmax(-1) for b in BRANCHES}
    for b in BRANCHES:
      correct[b] += int(((preds[b] == labels) & valid).sum())
    n_images += int(valid.sum())
    pred_correct = (preds['softmax'] == labels)[valid]

    # Localization: maps of the ground-truth class (the reference protocol).
    gt_maps, _ = cam.compute_cams_multi(
      fns['apply_fn'],
      variables,
      images,
      methods=methods,
      branches=BRANCHES,
      targets=jnp.asarray(labels, jnp.int32),
      output_size=size,
      head_fn=fns['head_fn'],
      head_weights_fn=fns['head_weights_fn'],
    )
    # Fidelity: maps of k* (softmax prediction) by default, as the paper's Table 1.
    if e.fidelity_target == 'label':
      fid_maps = gt_maps
      fid_targets = labels
    else:
      fid_targets = preds['softmax']
      fid_maps, _ = cam.compute_cams_multi(
        fns['apply_fn'],
        variables,
        images,
        methods=methods,
        branches=BRANCHES,
        targets=jnp.asarray(fid_targets, jnp.int32),
        output_size=size,
        head_fn=fns['head_fn'],
        head_weights_fn=fns['head_weights_fn'],
      )
    boxes = [np.asarray(batch['boxes'][i, : batch['num_boxes'][i]]) for i in np.flatnonzero(valid)]
    for k in keys:
      maps_k = np.asarray(gt_maps[k])[valid]
      if has_boxes:
        box_ev[k].accumulate(maps_k, boxes, pred_correct)
      if has_masks:
        mask_ev[k].accumulate(maps_k, np.asarray(batch['mask'])[valid])
      change = cam.confidence_change(
        fns['apply_fn'], variables, images, fid_maps[k], jnp.asarray(fid_targets, jnp.int32)
      )
      fid[k].accumulate(change, valid)
      if e.save_scoremaps:
        d = os.path.join(score_dir, f'{k[0]}_{k[1]}')
        for i, m in zip(np.flatnonzero(valid), maps_k):
          path = os.path.join(d, meta.image_ids[int(batch['index'][i])])
          os.makedirs(os.path.dirname(path), exist_ok=True)
          np.save(path + '.npy', m)  # <image_id>.npy, the layout evaluate_wsol reads
    need = e.num_plot_images - len(plot_store['image'])
    if need > 0:
      idx = np.flatnonzero(valid)[:need]
      plot_store['image'].extend(np.asarray(batch['image'])[idx])
      plot_store['boxes'].extend(
        np.asarray(batch['boxes'][i, : batch['num_boxes'][i]]) for i in idx
      )
      plot_store['title'].extend(f'class {labels[i]} / pred {preds["softmax"][i]}' for i in idx)
      for k in keys:
        plot_store['maps'][k].extend(np.asarray(gt_maps[k])[idx])
    bar.update(1)
  bar.close()

  results: dict = {
    'classification': {
      'softmax_top1': 100.0 * correct['softmax'] / n_images,
      'sigmoid_top1': 100.0 * correct['sigmoid'] / n_images,
    },
    'num_images': n_images,
    'split': split,
    'methods': {},
  }
  vanilla = _vanilla_variables(config, workdir)
  if vanilla is not None:
    acc = loop.evaluate_accuracy(
      config, vanilla, split=split, model=model, max_batches=e.max_batches
    )
    results['classification']['vanilla_softmax_top1'] = acc['softmax_top1']
  curves = {}
  for m in methods:
    results['methods'][m] = {}
    for b in BRANCHES:
      box = box_ev[(m, b)].compute() if has_boxes else None
      mask = mask_ev[(m, b)].compute() if has_masks else None
      r = _loc_summary(box, mask)
      r.update(fid[(m, b)].compute())
      results['methods'][m][b] = r
      curves[(m, b)] = (box, mask)
  if jax.process_index() == 0:
    _write_outputs(config, workdir, results, curves, plot_store)
  return results


def _fmt(v):
  return '–' if v is None else f'{v:.2f}'


def results_table(results: dict) -> str:
  """Markdown table laid out like the paper's Table 2 (plus fidelity), with a delta row."""
  cls = results['classification']
  cols = [
    ('Top-1 Loc', 'top1_loc'),
    ('GT-known Loc', 'gt_known_loc'),
    ('MaxBoxAccV2', 'maxboxacc_v2'),
    ('PxAP', 'pxap'),
    ('Avg Drop ↓', 'avg_drop'),
    ('Inc Conf ↑', 'inc_conf'),
  ]
  lines = [
    '| Method | Head | Top-1 Cls | ' + ' | '.join(c for c, _ in cols) + ' |',
    '|---|---|---|' + '---|' * len(cols),
  ]
  for m, heads in results['methods'].items():
    base, ours = heads['softmax'], heads['sigmoid']
    lines.append(
      f'| {m} | softmax (baseline) | {_fmt(cls["softmax_top1"])} | '
      + ' | '.join(_fmt(base.get(k)) for _, k in cols)
      + ' |'
    )
    lines.append(
      f'| {m} | sigmoid (ours) | – | ' + ' | '.join(_fmt(ours.get(k)) for _, k in cols) + ' |'
    )
    delta = [None if base.get(k) is None else ours[k] - base[k] for _, k in cols]
    lines.append(
      f'| {m} | Δ (ours − baseline) | | '
      + ' | '.join('–' if d is None else f'{d:+.2f}' for d in delta)
      + ' |'
    )
  note = (
    f'\nTop-1 Cls of the softmax head: dual model {cls["softmax_top1"]:.2f}'
    + (
      f', vanilla checkpoint {cls["vanilla_softmax_top1"]:.2f}'
      if 'vanilla_softmax_top1' in cls
      else ''
    )
    + f'; sigmoid head (for information) {cls["sigmoid_top1"]:.2f}. '
    f'{results["num_images"]} images of split "{results["split"]}".\n'
  )
  return '\n'.join(lines) + '\n' + note


def _write_outputs(config, workdir, results, curves, plot_store) -> None:
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  table = results_table(results)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(f'# {config.experiment}: {config.model.arch} on {config.input.dataset_name}\n\n')
    f.write(table)
  print(table)
  plot_dir = os.path.join(workdir, 'plots')
  os.makedirs(plot_dir, exist_ok=True)
  for m in config.eval.methods:
    boxes = {b: curves[(m, b)][0] for b in BRANCHES if curves[(m, b)][0] is not None}
    masks = {b: curves[(m, b)][1] for b in BRANCHES if curves[(m, b)][1] is not None}
    if boxes:
      wsol_plots.plot_box_curves(
        boxes,
        os.path.join(plot_dir, f'boxacc_{m}.png'),
        title=f'{m}: box accuracy vs CAM threshold',
      )
    if masks:
      wsol_plots.plot_pr_curves(
        masks, os.path.join(plot_dir, f'pxap_pr_{m}.png'), title=f'{m}: pixel precision-recall'
      )
    if plot_store['image']:
      cam.save_cam_grid(
        os.path.join(plot_dir, f'cams_{m}.png'),
        np.stack(plot_store['image']),
        np.stack(plot_store['maps'][(m, 'softmax')]),
        np.stack(plot_store['maps'][(m, 'sigmoid')]),
        gt_boxes=plot_store['boxes'],
        threshold=config.eval.loc_threshold,
        titles=plot_store['title'],
      )
