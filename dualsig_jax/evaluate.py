"""Evaluation of a trained dual-branch model: classification, WSOL localization and fidelity.

For every configured CAM method and both heads (baseline = softmax head, ours = sigmoid head):
maps of the ground-truth class feed the box / mask evaluators (as the reference: Top-1 Loc also
needs a correct softmax prediction), maps of the predicted class k* feed Average Drop and
Increase in Confidence. The vanilla checkpoint's Top-1 comes from one extra forward per batch.

Multi-host: every process reads its own shard of the split, each forward pass is sharded over
all devices of all processes, and the evaluators' states are combined exactly before any metric
is computed (`dualsig_jax.combine`), so N processes give the metrics of one. Process 0
writes results.json, results.md and the plots; with `eval.save_scoremaps` every process writes
the maps of its own images (distinct files) under `<workdir>/scoremaps`.
"""

from __future__ import annotations

import itertools
import logging
import os

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from dualsig_jax import cam, combine, data, defaults, models, report, wsol
from dualsig_jax.cam.fidelity import FidelityAccumulator
from dualsig_jax.train import checkpoints, sharding, summary
from dualsig_jax.train import stage as stage_lib

log = logging.getLogger('dualsig_jax')
BRANCHES = report.BRANCHES
# Heads whose Top-1 is counted ('vanilla' = the softmax head of the vanilla checkpoint).
TOP1_HEADS = ('softmax', 'sigmoid', 'vanilla')
# What eval.py reports in one line: a wrong checkpoint (missing, damaged, another model's) or a
# setting that does not fit this machine (the batch over the devices).
USER_ERRORS = (FileNotFoundError, ValueError, checkpoints.CheckpointCorruptError)


def evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  variables: dict | None = None,
  split: str | None = None,
  checkpoint: str | None = None,
  overlap: bool = True,
) -> dict:
  """Evaluates a dual-branch model on `split` and writes the results under `workdir`.

  The model is, in this order: `variables` if given; else the dual-branch checkpoint folder
  `checkpoint` (a converter output folder, e.g. a reference `.pth.tar` converted with
  `python -m dualsig_jax.convert`, or any stage's `<workdir>/<stage>/checkpoints`); else the
  newest `<workdir>/dual/checkpoints` step. A checkpoint's model record (arch, family,
  num_classes, large_feature_map) is checked against `config.model` as for training.

  Runs on every process of a `jax.distributed` job (each reads its shard of the split);
  `config.eval.batch_size` is the global batch. Returns the results dict (the same on every
  process) that process 0 also writes to `<workdir>/results.json` (the run's own settings) or
  `<workdir>/results-<split>-<methods>-<hash>.json` (any other: `report.output_names`), so
  evaluations with different settings never overwrite each other; its `checkpoints` entry
  records which checkpoint (folder and step) of each stage was evaluated.

  `overlap=False` evaluates each batch on the host before dispatching the next (the previous
  behaviour; `bench/bench_eval.py` compares the two).

  Raises:
    FileNotFoundError: no such checkpoint. ValueError: a checkpoint of another model (names
      the field), or one without the sigmoid head `fc2`.
  """
  defaults.validate(config)
  split = split or config.input.eval_split
  names = report.output_names(config, workdir, split, checkpoint)
  mesh = sharding.make_mesh()
  local_batch = sharding.check_global_batch(config.eval.batch_size, mesh, 'eval.batch_size')
  model = stage_lib.build_stage_model(config, 'dual')
  if variables is not None:
    sources = {'dual': {'path': None, 'step': None}}
  else:
    path = checkpoint or stage_lib.checkpoint_dir(workdir, 'dual')
    variables, info = stage_lib.load_dual_checkpoint(config, path, model)
    sources = {'dual': {'path': os.path.abspath(path), 'step': info.get('step')}}
    if checkpoint is None:
      sources['dual'].update(dual_progress(config, workdir, info.get('step')))
  vanilla, vanilla_source = _vanilla_variables(config, workdir, variables)
  if vanilla_source is not None:
    sources['vanilla'] = vanilla_source
  repl = sharding.replicated(mesh)
  variables = jax.device_put(variables, repl)
  vanilla = None if vanilla is None else jax.device_put(vanilla, repl)

  loader = data.make_eval_loader(
    config.input,
    split,
    batch_size=local_batch,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_classes=config.model.num_classes,
  )
  acc = _Accumulators(config.eval, loader.metadata, with_vanilla=vanilla is not None)
  batch_fn = make_batch_fn(model, config, mesh)
  plots = _PlotStore(config.eval.num_plot_images, acc.keys)
  n_batches = len(loader)  # the same on every process: the loader pads short shards
  if config.eval.max_batches > 0:
    n_batches = min(n_batches, config.eval.max_batches)
  if jax.process_index() == 0:
    log.info(
      'evaluating split %s: %d batches of %d on %d devices (%d processes); vanilla Top-1: %s',
      split,
      n_batches,
      config.eval.batch_size,
      mesh.devices.size,
      jax.process_count(),
      'yes' if vanilla is not None else 'no checkpoint',
    )
  # Score maps of other settings go beside the run's own, as the results files do.
  scoremaps = 'scoremaps' if names.stem == 'results' else os.path.join('scoremaps', names.stem)
  bar = tqdm(total=n_batches, desc='eval', disable=jax.process_index() != 0, dynamic_ncols=True)

  def finish(batch, out_on_device):
    """Host side of one batch: fetch its rows, feed the evaluators, save maps and plots."""
    out = jax.tree.map(_local_rows, out_on_device)
    acc.add(batch, out)
    if config.eval.save_scoremaps:
      _save_scoremaps(os.path.join(workdir, scoremaps), loader.metadata, batch, out['maps'])
    if jax.process_index() == 0:
      plots.add(batch, out)
    bar.update(1)

  # Dispatch before blocking: batch i+1's forward passes and maps are queued on the devices
  # (asynchronous dispatch) before the host evaluates batch i, so the two overlap.
  # islice: with eval.max_batches the loop must not ask for (and read) a batch past the last.
  pending = None
  try:  # the bar ends its line even on an error, so an entry point's one-line error is alone
    for batch in itertools.islice(loader, n_batches):
      gbatch = sharding.to_global({'image': batch['image'], 'label': batch['label']}, mesh)
      dispatched = (batch, batch_fn(variables, vanilla, gbatch['image'], gbatch['label']))
      if not overlap:
        finish(*dispatched)
        continue
      if pending is not None:
        finish(*pending)
      pending = dispatched
    if pending is not None:
      finish(*pending)
  finally:
    bar.close()

  combine.combine_over_processes(acc.evaluators())
  results, curves = acc.results(split)
  results['checkpoints'] = sources
  results['settings'] = names.settings
  results['paper'] = report.paper_comparison(
    results, config.input.dataset_name, config.model.arch, config.model.family
  )
  if jax.process_index() == 0:
    report.write_outputs(config, workdir, results, curves, plots, names)
  tb_folder = 'eval' if names.stem == 'results' else 'eval-' + names.stem[len('results-') :]
  summary.write_eval(config, workdir, results, sources['dual']['step'], tb_folder)
  return results


def dual_progress(config, workdir: str, step: int | None) -> dict:
  """{'total': the step the config trains the dual stage to, 'finished': bool} for the workdir's
  own dual checkpoint, with a warning when it is unfinished or its vanilla input has changed
  since it trained; {} when that cannot be told (e.g. no train split on this machine)."""
  try:
    progress = stage_lib.stage_progress(config, workdir).get('dual')
  except (OSError, ValueError) as e:  # an eval-only machine may lack the train split
    log.info('not checking whether the dual stage finished: %s', e)
    return {}
  if progress is None:
    return {}
  total = progress['total']
  finished = step is not None and step >= total
  if not finished and jax.process_index() == 0:
    log.warning(
      'evaluating an unfinished dual stage: checkpoint step %s of %s (rerun train.py with the '
      'same --workdir to finish it)',
      step,
      total,
    )
  if progress.get('source_change') and jax.process_index() == 0:
    log.warning('the dual stage is stale: %s', progress['source_change'])
  return {'total': int(total), 'finished': bool(finished)}


def _vanilla_variables(config, workdir: str, dual_variables: dict) -> tuple[dict | None, dict]:
  """The vanilla classifier laid over the dual model's variables (a vanilla checkpoint may lack
  fc2, which is then the dual model's: only the softmax head is read) and {'path', 'step'} of
  its checkpoint; (None, None) when there is no vanilla checkpoint."""
  src = stage_lib.vanilla_source(config, workdir)
  if not os.path.isdir(src):
    return None, None
  loaded, info = checkpoints.restore_variables(src)
  stage_lib.check_source_matches(info, config, src)
  merged, _ = stage_lib.overlay_variables(dual_variables, loaded, where=src)
  return merged, {'path': os.path.abspath(src), 'step': info.get('step')}


def make_batch_fn(model, config, mesh):
  """One jitted step per global batch: predictions, maps and confidence changes, per image.

  `(variables, vanilla_variables | None, images [B, S, S, 3] f32, labels [B] i32)` -> dict of
  arrays sharded like the batch: `pred` {head: i32 [B]}, `maps` {'<method>/<branch>': f32
  [B, S, S]} (ground-truth class), `drop` and `increase` {same keys: f32 [B]}.
  """
  fns = models.cam_fns(model)
  e = config.eval
  methods = tuple(e.methods)
  size = (config.input.eval_size, config.input.eval_size)

  def maps_for(variables, images, targets):
    maps, _ = cam.compute_cams_multi(
      fns['apply_fn'],
      variables,
      images,
      methods=methods,
      branches=BRANCHES,
      targets=targets,
      output_size=size,
      head_fn=fns['head_fn'],
      head_weights_fn=fns['head_weights_fn'],
    )
    return {f'{m}/{b}': v for (m, b), v in maps.items()}

  def step(variables, vanilla, images, labels):
    logits = fns['apply_fn'](variables, images)
    pred = {b: logits[f'{b}_logits'].argmax(-1).astype(np.int32) for b in BRANCHES}
    if vanilla is not None:
      pred['vanilla'] = fns['apply_fn'](vanilla, images)['softmax_logits'].argmax(-1)
    # Localization: maps of the ground-truth class (the reference protocol).
    gt_maps = maps_for(variables, images, labels)
    # Fidelity: maps of k* (softmax prediction) by default, as the paper's Table 1.
    fid_targets = labels if e.fidelity_target == 'label' else pred['softmax']
    fid_maps = gt_maps if e.fidelity_target == 'label' else maps_for(variables, images, fid_targets)
    changes = {
      k: cam.confidence_change(fns['apply_fn'], variables, images, m, fid_targets)
      for k, m in fid_maps.items()
    }
    return {
      'pred': pred,
      'maps': gt_maps,
      'drop': {k: c['drop'] for k, c in changes.items()},
      'increase': {k: c['increase'] for k, c in changes.items()},
    }

  return jax.jit(step, out_shardings=sharding.data_sharded(mesh))


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in batch order (numpy)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


class _Accumulators:
  """Every streaming metric of one process: Top-1 counts, box / mask evaluators, fidelity."""

  def __init__(self, eval_cfg, metadata, *, with_vanilla: bool):
    self.methods = tuple(eval_cfg.methods)
    self.keys = [f'{m}/{b}' for m in self.methods for b in BRANCHES]
    self.heads = TOP1_HEADS if with_vanilla else BRANCHES
    self.top1 = combine.Counts((*self.heads, 'num_images'))  # correct predictions per head
    self.box = {}
    if metadata.boxes:
      self.box = {
        k: wsol.BoxEvaluator(
          iou_threshold_list=tuple(eval_cfg.iou_threshold_list),
          cam_curve_interval=eval_cfg.cam_curve_interval,
          multi_contour_eval=eval_cfg.multi_contour_eval,
          loc_threshold=eval_cfg.loc_threshold,
        )
        for k in self.keys
      }
    self.mask = {}
    if metadata.masks:
      self.mask = {
        k: wsol.MaskEvaluator(cam_curve_interval=eval_cfg.cam_curve_interval) for k in self.keys
      }
    self.fid = {k: FidelityAccumulator() for k in self.keys}

  def add(self, batch: dict, out: dict) -> None:
    """Adds this process's rows of one batch (`batch`: loader batch, `out`: local rows)."""
    valid = np.asarray(batch['valid'], bool)
    labels = np.asarray(batch['label'])
    for h in self.heads:
      self.top1.add(h, ((out['pred'][h] == labels) & valid).sum())
    self.top1.add('num_images', valid.sum())
    for k in self.keys:
      self.fid[k].accumulate({'drop': out['drop'][k], 'increase': out['increase'][k]}, valid)
    if not valid.any():  # a padding batch of a short shard: nothing to localize
      return
    idx = np.flatnonzero(valid)
    boxes = [np.asarray(batch['boxes'][i, : batch['num_boxes'][i]]) for i in idx]
    pred_correct = (out['pred']['softmax'] == labels)[idx]
    for k in self.keys:
      maps = out['maps'][k][idx]
      if self.box:
        self.box[k].accumulate(maps, boxes, pred_correct)
      if self.mask:
        self.mask[k].accumulate(maps, np.asarray(batch['mask'])[idx])

  def evaluators(self) -> dict:
    """Every streaming evaluator under a name (the same on every process), for the combine."""
    out = {'top1': self.top1}
    for kind, evs in (('box', self.box), ('mask', self.mask), ('fidelity', self.fid)):
      out.update({f'{kind}/{k}': ev for k, ev in evs.items()})
    return out

  def results(self, split: str) -> tuple[dict, dict]:
    """(results dict, {(method, branch): (box metrics | None, mask metrics | None)})."""
    correct = self.top1.compute()
    n = correct['num_images']
    if n == 0:
      raise ValueError(f'split {split!r} has no images to evaluate')
    cls = {f'{h}_top1': 100.0 * correct[h] / n for h in BRANCHES}
    if 'vanilla' in correct:
      cls['vanilla_softmax_top1'] = 100.0 * correct['vanilla'] / n
    results = {'classification': cls, 'num_images': n, 'split': split, 'methods': {}}
    curves = {}
    for m in self.methods:
      results['methods'][m] = {}
      for b in BRANCHES:
        k = f'{m}/{b}'
        box = self.box[k].compute() if self.box else None
        mask = self.mask[k].compute() if self.mask else None
        r = _loc_summary(box, mask)
        r.update(self.fid[k].compute())
        results['methods'][m][b] = r
        curves[(m, b)] = (box, mask)
    return results, curves


class _PlotStore:
  """The first `n` valid images of this process with their maps, for the CAM grid."""

  def __init__(self, n: int, keys):
    self.n = n
    self.image, self.boxes, self.title = [], [], []
    self.maps = {k: [] for k in keys}

  def add(self, batch: dict, out: dict) -> None:
    idx = np.flatnonzero(np.asarray(batch['valid'], bool))[: self.n - len(self.image)]
    labels, pred = np.asarray(batch['label']), out['pred']['softmax']
    for i in idx:
      self.image.append(np.asarray(batch['image'][i]))
      self.boxes.append(np.asarray(batch['boxes'][i, : batch['num_boxes'][i]]))
      self.title.append(f'class {labels[i]} / pred {pred[i]}')
      for k, maps in self.maps.items():
        maps.append(out['maps'][k][i])


def _save_scoremaps(root: str, metadata, batch: dict, maps: dict) -> None:
  """`<root>/<method>_<branch>/<image_id>.npy` (the layout evaluate_wsol reads), valid rows."""
  rows = np.flatnonzero(np.asarray(batch['valid'], bool))
  for k, m in maps.items():
    d = os.path.join(root, k.replace('/', '_'))
    for i in rows:
      path = os.path.join(d, metadata.image_ids[int(batch['index'][i])])
      os.makedirs(os.path.dirname(path), exist_ok=True)
      np.save(path + '.npy', m[i])


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
