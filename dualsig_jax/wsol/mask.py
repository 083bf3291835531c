"""Streaming PxAP (pixel average precision with ignore regions), wsolevaluation protocol."""

from __future__ import annotations

import numpy as np

from dualsig_jax.wsol.box import cam_thresholds, check_scoremaps

__all__ = ['MaskEvaluator']


class MaskEvaluator:
  """PxAP as wsolevaluation's ``MaskEvaluator``.

  Bins: ``[t_0, t_1), ..., [t_{T-1}, 1), [1, 2), [2, 3]`` with ``t = np.arange(0, 1, interval)``
  (``np.histogram`` semantics, last bin closed). Scores at GT pixels (mask 1) and at background
  pixels (mask 0) are histogrammed separately; 255 (ignore) pixels are skipped.

  Args:
    cam_curve_interval: CAM threshold interval (reference default 0.001).
  """

  def __init__(self, cam_curve_interval=0.001):
    self.thresholds = cam_thresholds(cam_curve_interval)
    self.cam_curve_interval = float(cam_curve_interval)
    self.edges = np.append(self.thresholds, [1.0, 2.0, 3.0])
    self.num_bins = len(self.thresholds) + 2
    self.reset()

  # The streaming protocol shared by the evaluators (see dualsig_jax.combine).
  def reset(self) -> None:
    """Forgets every accumulated image."""
    self.gt_true_hist = np.zeros(self.num_bins, dtype=np.int64)
    self.gt_false_hist = np.zeros(self.num_bins, dtype=np.int64)
    self.num_images = 0

  def state(self) -> dict:
    """``gt_true_hist`` / ``gt_false_hist`` int64 ``[T + 2]`` and ``num_images``."""
    return {
      'gt_true_hist': self.gt_true_hist.copy(),
      'gt_false_hist': self.gt_false_hist.copy(),
      'num_images': self.num_images,
    }

  def merge(self, state: dict) -> None:
    """Adds another evaluator's ``state()`` (same thresholds; e.g. another process)."""
    for k in ('gt_true_hist', 'gt_false_hist'):
      h = np.asarray(state[k], np.int64)
      if h.shape != (self.num_bins,):
        raise ValueError(f'state {k} has shape {h.shape}, this evaluator {(self.num_bins,)}')
      setattr(self, k, getattr(self, k) + h)
    self.num_images += int(state['num_images'])

  def _bins(self, x):
    """Bin of each float64 score in [0, 1], as ``np.histogram(x, bins=edges)`` counts it.

    The uniform guess ``floor(x / interval)`` is off by at most one bin (the edges are
    ``fl(i * interval)``, the division rounds once: both err by ~1e-16 relative), so one
    comparison with each neighbouring edge makes it exact.
    """
    k = np.minimum((x / self.cam_curve_interval).astype(np.int64), len(self.thresholds))
    k -= x < self.edges[k]
    k += x >= self.edges[k + 1]
    return k

  def accumulate(self, scoremaps, gt_masks):
    """Adds a batch.

    Args:
      scoremaps: float ``[B, H, W]`` in [0, 1].
      gt_masks: uint8 ``[B, H, W]``: 1 object, 0 background, 255 ignore.
    """
    maps = check_scoremaps(scoremaps)
    masks = np.asarray(gt_masks)
    if masks.shape != maps.shape:
      raise ValueError(f'gt_masks shape {masks.shape} != scoremaps shape {maps.shape}')
    bad = (masks != 0) & (masks != 1) & (masks != 255)
    if bad.any():
      raise ValueError(f'gt_masks may only hold 0, 1, 255; found {np.unique(masks[bad])[:5]}')
    # One pass over the kept pixels: bin index, offset by num_bins for object pixels. float64 as
    # the reference (its maps are float64 after t2n), so scores compare with the edges exactly.
    keep = masks != 255
    x = maps[keep].astype(np.float64)
    k = self._bins(x) + self.num_bins * (masks[keep] == 1)
    hist = np.bincount(k, minlength=2 * self.num_bins)
    self.gt_false_hist += hist[: self.num_bins]
    self.gt_true_hist += hist[self.num_bins :]
    self.num_images += len(maps)

  def curve(self):
    """Precision and recall arrays (float64 ``[T + 2]``, thresholds descending: >=2, >=1, ...).

    Entries where nothing is predicted positive are NaN in precision (0/0), as the reference.
    """
    true_hist = self.gt_true_hist.astype(np.float64)
    false_hist = self.gt_false_hist.astype(np.float64)
    num_gt_true = true_hist.sum()
    tp = true_hist[::-1].cumsum()
    fn = num_gt_true - tp
    fp = false_hist[::-1].cumsum()
    if ((tp + fn) <= 0).all():
      raise ValueError('No positive ground truth pixel in the evaluated set.')
    if ((tp + fp) <= 0).all():
      raise ValueError('No positive prediction in the evaluated set.')
    with np.errstate(divide='ignore', invalid='ignore'):
      precision = tp / (tp + fp)
      recall = tp / (tp + fn)
    return precision, recall, (tp + fp) != 0

  def compute(self) -> dict:
    """Returns ``{'pxap': AP x 100, 'precision': [...], 'recall': [...], 'num_images': N}``."""
    if self.num_images == 0:
      raise ValueError('MaskEvaluator.compute() called before any accumulate()')
    precision, recall, non_zero = self.curve()
    auc = (precision[1:] * np.diff(recall))[non_zero[1:]].sum() * 100
    return {
      'pxap': float(auc),
      'precision': np.nan_to_num(precision).tolist(),
      'recall': recall.tolist(),
      'num_images': int(self.num_images),
    }
