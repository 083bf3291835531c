"""Streaming box metrics (MaxBoxAcc, MaxBoxAccV2, GT-known / Top-1 Loc), wsolevaluation protocol.

Counts per (IoU threshold, CAM threshold) are accumulated, never maps, so memory is flat in the
number of images. Per-image work (:func:`dualsig_jax.wsol.levels.image_box_ious`) is CPU-bound
and spends its time in the compiled kernel (ctypes releases the GIL) or in OpenCV (which does
too), so it runs on a thread pool by default: no process start, nothing to pickle, and safe in a
plain script without an ``if __name__ == '__main__'`` guard. ``pool='process'`` (opt-in) uses
``spawn`` workers instead, safe next to JAX's threads but needing that guard in scripts.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import multiprocessing
import os

import numpy as np

from dualsig_jax import vocab
from dualsig_jax.wsol.levels import image_box_ious

__all__ = ['BoxEvaluator', 'POOLS', 'check_scoremaps', 'cam_thresholds']

# BoxEvaluator(pool=...): where per-image work runs when num_workers > 1.
POOLS = ('thread', 'process')
_EXECUTORS: dict[tuple[str, int, int], concurrent.futures.Executor] = {}


def cam_thresholds(interval: float) -> np.ndarray:
  """``np.arange(0, 1, interval)`` (float64), the reference's CAM threshold list.

  ``interval`` must lie in ``vocab.CAM_CURVE_INTERVAL_RANGE`` (> 0 and <= 1), the range the
  config schema checks too; ValueError otherwise (NaN included).
  """
  low, high = vocab.CAM_CURVE_INTERVAL_RANGE
  if not low < interval <= high:
    raise ValueError(f'cam_curve_interval must be > {low} and <= {high}; got {interval}')
  return np.arange(0, 1, interval)


def check_scoremaps(scoremaps, names=None) -> np.ndarray:
  """Validates maps as wsolevaluation's ``check_scoremap_validity`` (2-D, no NaN, in [0, 1]).

  Args:
    scoremaps: float ``[B, H, W]``.
    names: optional ``[B]`` strings used in error messages (e.g. file paths).
  Returns:
    the maps as a float ``[B, H, W]`` numpy array. Raises ``ValueError`` naming the bad map.
  """
  maps = np.asarray(scoremaps)
  if maps.ndim != 3:
    raise ValueError(f'scoremaps must be [B, H, W]; got shape {maps.shape}')
  if maps.shape[1] == 0 or maps.shape[2] == 0:
    raise ValueError(f'scoremaps are empty (H or W is 0); got shape {maps.shape}')
  if not np.issubdtype(maps.dtype, np.floating):
    raise ValueError(f'scoremaps must be floating point; got {maps.dtype}')
  for i in np.flatnonzero(
    np.isnan(maps).any(axis=(1, 2)) | (maps < 0).any(axis=(1, 2)) | (maps > 1).any(axis=(1, 2))
  )[:1]:
    what = names[i] if names is not None else f'scoremap {i} of the batch'
    m = maps[i]
    if np.isnan(m).any():
      raise ValueError(f'{what}: score map contains NaN')
    raise ValueError(
      f'{what}: score map must lie in [0, 1]; min={np.nanmin(m)}, max={np.nanmax(m)}'
    )
  return maps


def _check_boxes(boxes, i, shape):
  b = np.asarray(boxes)
  if b.ndim != 2 or b.shape[1] != 4 or len(b) == 0:
    raise ValueError(f'gt_boxes[{i}] must be a non-empty int array [N, 4]; got shape {b.shape}')
  if not np.issubdtype(b.dtype, np.integer):
    raise ValueError(f'gt_boxes[{i}] must be integer (x0, y0, x1, y1); got {b.dtype}')
  if (b < 0).any() or (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
    raise ValueError(
      f'gt_boxes[{i}] violates the x0y0x1y1 convention (non-negative, x1 >= x0, '
      f'y1 >= y0): {b.tolist()}'
    )
  return b.astype(np.int64)


def _count_chunk(maps, boxes, correct, thresholds, ious):
  """Counts for a chunk of images: int64 ``[4, num_ious, T]`` (multi, largest, gt-known, top-1)."""
  out = np.zeros((4, len(ious), len(thresholds)), dtype=np.int64)
  if not len(maps):
    return out
  thr = np.asarray(ious, dtype=np.float64)[:, None] / 100  # reference: iou >= THRESHOLD / 100
  res = [image_box_ious(m, b, thresholds) for m, b in zip(maps, boxes)]
  for i, key in enumerate(('multi', 'largest', 'largest_first')):
    hit = np.stack([r[key] for r in res])[:, None, :] >= thr  # [B, num_ious, T]
    out[i] = hit.sum(axis=0)
    if key == 'largest_first':
      out[3] = hit[np.asarray(correct, bool)].sum(axis=0)
  return out


def _executor(pool, num_workers):
  # By pid too: a forked child inherits the dict but not the parent's worker threads.
  key = (pool, num_workers, os.getpid())
  if key not in _EXECUTORS:
    if pool == 'thread':
      _EXECUTORS[key] = concurrent.futures.ThreadPoolExecutor(
        num_workers, thread_name_prefix='wsol-box'
      )
    else:
      _EXECUTORS[key] = concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context('spawn')
      )
  return _EXECUTORS[key]


@atexit.register
def _shutdown_pools():
  for (_, _, pid), ex in _EXECUTORS.items():
    if pid == os.getpid():  # never a parent's pool from a forked child
      ex.shutdown(wait=False, cancel_futures=True)
  _EXECUTORS.clear()


def _is_int(x) -> bool:
  try:
    return float(x) == int(x)
  except (TypeError, ValueError, OverflowError):  # a string, NaN, inf
    return False


def _check_options(loc_threshold, num_workers) -> None:
  """One clear error for a value the evaluator would otherwise clamp or ignore."""
  try:
    t = float(loc_threshold)
  except (TypeError, ValueError):
    t = float('nan')
  if isinstance(loc_threshold, bool) or not 0.0 <= t <= 1.0:  # NaN fails too
    raise ValueError(
      f'loc_threshold must be a CAM threshold in [0, 1]; got {loc_threshold!r} (it picks the '
      'nearest of the thresholds np.arange(0, 1, cam_curve_interval))'
    )
  if num_workers is not None and (
    isinstance(num_workers, bool) or not _is_int(num_workers) or int(num_workers) < 0
  ):
    raise ValueError(
      f'num_workers must be None (all cores) or an integer >= 0 (0 or 1: in the calling '
      f'thread); got {num_workers!r}'
    )


class BoxEvaluator:
  """MaxBoxAcc / MaxBoxAccV2 / GT-known Loc / Top-1 Loc, streaming.

  Args:
    iou_threshold_list: IoU thresholds in percent (reference: 30, 50, 70).
    cam_curve_interval: CAM thresholds are ``np.arange(0, 1, interval)``.
    multi_contour_eval: MaxBoxAcc over all contours' boxes (MaxBoxAccV2 protocol); False: the
      largest contour only (the original MaxBoxAcc).
    loc_threshold: CAM threshold of GT-known / Top-1 Loc (nearest threshold of the list).
    num_workers: parallel workers for per-image work; None = ``os.cpu_count()``; 0 or 1 = in
      the calling thread. Small batches (fewer than 2 images per worker) are always done there.
    pool: ``'thread'`` (default; the kernel and OpenCV release the GIL) or ``'process'``
      (spawned workers: a script using it needs an ``if __name__ == '__main__'`` guard).
  """

  def __init__(
    self,
    iou_threshold_list=(30, 50, 70),
    cam_curve_interval=0.001,
    multi_contour_eval=True,
    loc_threshold=0.2,
    num_workers=None,
    pool='thread',
  ):
    if pool not in POOLS:
      raise ValueError(f'pool={pool!r} is not one of {list(POOLS)}')
    self.pool = pool
    ious = list(iou_threshold_list)
    # 30.7 must not become 30 silently, nor True become 1.
    if not ious or any(isinstance(i, bool) or not _is_int(i) or not 0 < i <= 100 for i in ious):
      raise ValueError(
        f'iou_threshold_list must hold integers in (0, 100]; got {iou_threshold_list}'
      )
    self.iou_threshold_list = [int(i) for i in ious]
    _check_options(loc_threshold, num_workers)
    # IoU 50 is always counted: MaxBoxAcc v1 and the headline GT-known / Top-1 Loc use it.
    self._ious = sorted(set(self.iou_threshold_list) | {50})
    self.thresholds = cam_thresholds(cam_curve_interval)
    self.cam_curve_interval = cam_curve_interval
    self.multi_contour_eval = bool(multi_contour_eval)
    self.loc_index = int(np.argmin(np.abs(self.thresholds - loc_threshold)))
    self.loc_threshold = loc_threshold
    self.num_workers = os.cpu_count() if num_workers is None else int(num_workers)
    self.reset()

  # The streaming protocol every evaluator of this project shares (see dualsig_jax.combine):
  # state() -> plain arrays, merge(state) adds one, reset() empties.
  def reset(self) -> None:
    """Forgets every accumulated image."""
    self.counts = np.zeros((4, len(self._ious), len(self.thresholds)), dtype=np.int64)
    self.num_images = 0
    self.num_with_pred = 0

  def state(self) -> dict:
    """``counts`` int64 ``[4, I, T]`` (box / GT-known / Top-1 / v1 hits per IoU and threshold),
    ``num_images``, ``num_with_pred``."""
    return {
      'counts': self.counts.copy(),
      'num_images': self.num_images,
      'num_with_pred': self.num_with_pred,
    }

  def merge(self, state: dict) -> None:
    """Adds another evaluator's ``state()`` (same IoUs and thresholds; e.g. another process)."""
    counts = np.asarray(state['counts'], np.int64)
    if counts.shape != self.counts.shape:
      raise ValueError(f"state counts {counts.shape} != this evaluator's {self.counts.shape}")
    self.counts += counts
    self.num_images += int(state['num_images'])
    self.num_with_pred += int(state['num_with_pred'])

  def accumulate(self, scoremaps, gt_boxes, pred_correct=None):
    """Adds a batch.

    Args:
      scoremaps: float ``[B, H, W]`` in [0, 1] (the ground-truth class's maps).
      gt_boxes: list of B int arrays ``[N_i, 4]`` (x0, y0, x1, y1) in scoremap pixels.
      pred_correct: bool ``[B]`` (softmax prediction correct, for Top-1 Loc) or None. Either
        always or never given.
    """
    maps = check_scoremaps(scoremaps)
    if len(gt_boxes) != len(maps):
      raise ValueError(f'{len(maps)} scoremaps but {len(gt_boxes)} gt_boxes entries')
    boxes = [_check_boxes(b, i, maps.shape[1:]) for i, b in enumerate(gt_boxes)]
    if pred_correct is None:
      if self.num_with_pred:
        raise ValueError('pred_correct was given for earlier batches but not for this one')
      correct = np.zeros(len(maps), bool)
    else:
      if self.num_images != self.num_with_pred:
        raise ValueError('pred_correct given now but not for earlier batches')
      correct = np.asarray(pred_correct, dtype=bool).reshape(-1)
      if len(correct) != len(maps):
        raise ValueError(f'pred_correct has {len(correct)} entries for {len(maps)} maps')
      self.num_with_pred += len(maps)
    args = (self.thresholds, self._ious)
    workers = min(self.num_workers, len(maps) // 2)
    if workers <= 1:
      self.counts += _count_chunk(maps, boxes, correct, *args)
    else:
      pool = _executor(self.pool, self.num_workers)
      # A few chunks per worker: per-map cost varies ~10x (noisy maps), so this balances load.
      chunks = min(len(maps) // 2, 4 * workers)
      bounds = np.linspace(0, len(maps), chunks + 1).astype(int)
      futures = [
        pool.submit(_count_chunk, maps[a:b], boxes[a:b], correct[a:b], *args)
        for a, b in zip(bounds[:-1], bounds[1:])
      ]
      for f in futures:
        self.counts += f.result()
    self.num_images += len(maps)

  def compute(self) -> dict:
    """Metrics in percent.

    Returns:
      ``maxboxacc`` {iou: max over thresholds of box accuracy} (all contours when
      ``multi_contour_eval`` else the largest), ``maxboxacc_v2`` (their mean), ``maxboxacc_v1``
      (largest contour, IoU 50), ``gt_known_loc`` {iou: value at ``loc_threshold``} (largest
      contour vs the first GT box), ``top1_loc`` (same, also needing a correct prediction; only
      if ``pred_correct`` was given), ``best_threshold`` {iou: argmax threshold},
      ``curves`` (``thresholds`` and per-iou lists ``box_acc``, ``gt_known``, ``top1``),
      ``loc_threshold`` (the threshold used), ``num_images``.
    """
    if self.num_images == 0:
      raise ValueError('BoxEvaluator.compute() called before any accumulate()')
    acc = self.counts * 100.0 / float(self.num_images)
    pos = {i: self._ious.index(i) for i in self._ious}
    box_acc = acc[0] if self.multi_contour_eval else acc[1]
    keys = [str(i) for i in self.iou_threshold_list]
    out = {
      'maxboxacc': {k: float(box_acc[pos[i]].max()) for k, i in zip(keys, self.iou_threshold_list)},
      'best_threshold': {
        k: float(self.thresholds[box_acc[pos[i]].argmax()])
        for k, i in zip(keys, self.iou_threshold_list)
      },
      'maxboxacc_v1': float(acc[1][pos[50]].max()),
      'gt_known_loc': {
        k: float(acc[2][pos[i], self.loc_index]) for k, i in zip(keys, self.iou_threshold_list)
      },
      'loc_threshold': float(self.thresholds[self.loc_index]),
      'num_images': int(self.num_images),
      'multi_contour_eval': self.multi_contour_eval,
    }
    out['maxboxacc_v2'] = float(np.average([out['maxboxacc'][k] for k in keys]))
    curves = {
      'thresholds': self.thresholds.tolist(),
      'box_acc': {k: box_acc[pos[i]].tolist() for k, i in zip(keys, self.iou_threshold_list)},
      'gt_known': {k: acc[2][pos[i]].tolist() for k, i in zip(keys, self.iou_threshold_list)},
    }
    if self.num_with_pred:
      out['top1_loc'] = {
        k: float(acc[3][pos[i], self.loc_index]) for k, i in zip(keys, self.iou_threshold_list)
      }
      curves['top1'] = {k: acc[3][pos[i]].tolist() for k, i in zip(keys, self.iou_threshold_list)}
    out['curves'] = curves
    return out
