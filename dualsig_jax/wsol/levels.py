"""Per-image contour boxes at every CAM threshold, bit-compatible with wsolevaluation.

The reference (clovaai/wsolevaluation ``compute_bboxes_from_scoremaps``) quantizes a map to
uint8, and for every CAM threshold t (1000 of them at interval 0.001) binarizes it at
``q > int(t * q.max())``, runs ``cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)`` and takes
``boundingRect`` of every contour (multi-contour) or of the one with the largest
``cv2.contourArea`` (first one on ties, as Python's ``max``).

``int(t * qmax)`` takes at most 256 distinct values, and thresholds giving the same level set are
merged (:func:`distinct_levels`). Every distinct level's contours then come from:

- the compiled kernel (:mod:`dualsig_jax.wsol.native`, built at install time): the level sets are
  nested, so one union-find pass over the pixels holds all levels' components, boxes and contour
  areas without tracing (its cost does not grow with the number of levels or of contours),
  ties of the largest area resolved in OpenCV's contour order;
- or, without the kernel, the one exact fallback: the reference's own computation once per
  distinct level (``findContours(RETR_TREE)`` of the level set, cropped to its foreground's
  bounding box, which OpenCV's zero padding makes equivalent; boxes and shoelace areas of all
  contours in a few vectorized numpy reductions, the first largest contour on ties as Python's
  ``max``), :func:`exact_level_ious`.
"""

from __future__ import annotations

import cv2
import numpy as np

from dualsig_jax.wsol import native as native_kernel
from dualsig_jax.wsol.native import level_lut  # the kernel's input; re-exported here

__all__ = [
  'quantize',
  'threshold_cutoffs',
  'exact_level_ious',
  'level_lut',
  'distinct_levels',
  'level_contours',
  'box_iou',
  'image_box_ious',
]


def quantize(scoremap: np.ndarray) -> np.ndarray:
  """``(map * 255).astype(uint8)`` as the reference does it.

  The reference casts maps to float64 before quantizing (``t2n`` -> ``np.float``), so the product
  is taken in float64 (exact for float32 inputs); a float32 product could round up to the next
  integer and change the level sets.

  Args:
    scoremap: float array ``[H, W]`` (or any shape) in [0, 1].
  Returns:
    uint8 array of the same shape.
  """
  return (np.asarray(scoremap, dtype=np.float64) * 255).astype(np.uint8)


def threshold_cutoffs(qmax: int, thresholds: np.ndarray) -> np.ndarray:
  """Integer cutoffs ``int(t * qmax)`` for every threshold (float64 product, truncation).

  Args:
    qmax: the quantized map's maximum (0..255).
    thresholds: float64 ``[T]`` in [0, 1).
  Returns:
    int64 ``[T]``: a pixel is foreground at threshold t iff ``q > cutoff[t]``.
  """
  return (np.asarray(thresholds, dtype=np.float64) * np.float64(qmax)).astype(np.int64)


def level_contours(q: np.ndarray, levels: np.ndarray):
  """Boxes and areas of all contours of ``q > c`` for every cutoff ``c`` in ``levels``.

  Args:
    q: uint8 ``[H, W]`` quantized map.
    levels: int64 ``[L]`` cutoffs.
  Returns:
    ``(boxes, areas, counts)``: int64 ``[K, 4]`` reference boxes ``(x, y, min(x+w, W-1),
    min(y+h, H-1))`` from ``boundingRect``; float64 ``[K]`` ``cv2.contourArea`` values; int64
    ``[L]`` number of contours per level. Contours of one level are contiguous and in
    ``cv2.findContours(RETR_TREE)`` order (the reference's); levels in the order given.
  """
  height, width = q.shape
  levels = np.asarray(levels, dtype=np.int64)
  lv = levels[:, None]
  rows = q.max(axis=1)[None, :] > lv  # [L, H]: row has foreground at that level
  cols = q.max(axis=0)[None, :] > lv  # [L, W]
  has = rows.any(axis=1)
  y0 = rows.argmax(axis=1)
  y1 = height - rows[:, ::-1].argmax(axis=1)
  x0 = cols.argmax(axis=1)
  x1 = width - cols[:, ::-1].argmax(axis=1)

  contours, counts = [], np.zeros(len(levels), dtype=np.int64)
  find = cv2.findContours
  method = cv2.CHAIN_APPROX_SIMPLE
  for i in np.flatnonzero(has).tolist():
    ya, yb, xa, xb = int(y0[i]), int(y1[i]), int(x0[i]), int(x1[i])
    # A uint8 scalar keeps the comparison in uint8 (an int64 one upcasts: 5x slower).
    binary = np.greater(q[ya:yb, xa:xb], np.uint8(levels[i])).view(np.uint8)
    found = find(binary, cv2.RETR_TREE, method, offset=(xa, ya))[0]
    counts[i] = len(found)
    contours.extend(found)

  if not contours:
    return np.zeros((0, 4), np.int64), np.zeros(0, np.float64), counts
  lengths = np.fromiter(map(len, contours), dtype=np.int64, count=len(contours))
  pts = np.concatenate(contours).reshape(-1, 2)  # int32
  starts = np.zeros(len(lengths), dtype=np.int64)
  np.cumsum(lengths[:-1], out=starts[1:])
  xs, ys = pts[:, 0].astype(np.int64), pts[:, 1].astype(np.int64)
  bx0 = np.minimum.reduceat(xs, starts)
  by0 = np.minimum.reduceat(ys, starts)
  bx1 = np.minimum(np.maximum.reduceat(xs, starts) + 1, width - 1)
  by1 = np.minimum(np.maximum.reduceat(ys, starts) + 1, height - 1)
  boxes = np.stack([bx0, by0, bx1, by1], axis=1)
  # Shoelace exactly as cv2.contourArea: sum over i of prev.x * p.y - prev.y * p.x, where prev
  # of a contour's first point is its last point; integers, so int64 is exact. Shifted copies
  # instead of a gather.
  ends = starts + lengths - 1
  xp, yp = np.empty_like(xs), np.empty_like(ys)
  xp[1:], yp[1:] = xs[:-1], ys[:-1]
  xp[starts], yp[starts] = xs[ends], ys[ends]
  cross = xp * ys - yp * xs
  areas = np.abs(np.add.reduceat(cross, starts)).astype(np.float64) * 0.5
  return boxes, areas, counts


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
  """Inclusive-pixel IoU as wsolevaluation's ``calculate_multiple_iou``.

  Args:
    boxes_a: int ``[A, 4]`` (x0, y0, x1, y1).
    boxes_b: int ``[B, 4]``.
  Returns:
    float64 ``[A, B]``; pairs with a non-positive union get 0.
  """
  a = np.asarray(boxes_a, dtype=np.int64)[:, None, :]
  b = np.asarray(boxes_b, dtype=np.int64)[None, :, :]
  inter = np.maximum(
    0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1
  ) * np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
  area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
  area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
  denom = area_a + area_b - inter
  degenerate = denom <= 0
  ious = inter / np.where(degenerate, 1, denom)
  ious[degenerate] = 0
  return ious


def distinct_levels(q: np.ndarray, cutoffs: np.ndarray):
  """Sorted cutoffs with one per distinct level set, and each cutoff's index among them.

  Level sets are nested, so two cutoffs give the same set iff as many pixels pass both (maps
  with few distinct values have far fewer sets than cutoffs).

  Args:
    q: uint8 ``[H, W]``.
    cutoffs: int64 ``[T]``.
  Returns:
    ``(levels, inverse)``: int64 ``[L]`` ascending, int64 ``[T]`` with ``q > levels[inverse[t]]``
    the same set as ``q > cutoffs[t]``.
  """
  cutoffs = np.asarray(cutoffs, dtype=np.int64).reshape(-1)
  if len(cutoffs) > 1 and (cutoffs[1:] >= cutoffs[:-1]).all():
    uniq, inv = cutoffs, None  # ascending thresholds (the evaluators'): no sort needed
  else:
    uniq, inv = np.unique(cutoffs, return_inverse=True)
  above = q.size - np.cumsum(np.bincount(q.ravel(), minlength=256))  # [256]: #(q > c)
  count = above[uniq]
  new = np.ones(len(uniq), bool)
  new[1:] = count[1:] != count[:-1]  # above is non-increasing: equal sets are neighbours
  index = np.cumsum(new) - 1
  return uniq[new], index if inv is None else index[inv.reshape(-1)]


def exact_level_ious(q: np.ndarray, levels: np.ndarray, gt_boxes: np.ndarray):
  """Per-level IoUs by tracing every level set with OpenCV, as the reference (the fallback).

  Args:
    q: uint8 ``[H, W]``.
    levels: int64 ``[L]`` cutoffs.
    gt_boxes: int64 ``[G, 4]``, G >= 1.
  Returns:
    ``(multi, largest, largest_first)``, float64 ``[L]`` each (see :func:`image_box_ious`).
  """
  return _level_ious(*level_contours(q, levels), gt_boxes)


def image_box_ious(
  scoremap: np.ndarray, gt_boxes: np.ndarray, thresholds: np.ndarray, native: bool | None = None
):
  """Per-threshold IoUs of one map, as the reference computes them.

  Args:
    scoremap: float ``[H, W]`` in [0, 1] (validated by the caller).
    gt_boxes: int ``[G, 4]`` (x0, y0, x1, y1) in scoremap pixels, G >= 1.
    thresholds: float64 ``[T]`` CAM thresholds.
    native: use the compiled kernel (:mod:`dualsig_jax.wsol.native`): None = when it is
      available, True = required (RuntimeError if not), False = the exact OpenCV fallback.
  Returns:
    dict of float64 ``[T]`` arrays:
      ``multi``: best IoU over all contours' boxes and all GT boxes (MaxBoxAccV2);
      ``largest``: IoU of the largest contour's box, best over all GT boxes (MaxBoxAcc v1);
      ``largest_first``: IoU of the largest contour's box with the first GT box (GT-known Loc).
    A level with no contour uses the box (0, 0, 0, 0), as the reference.
  """
  q = quantize(scoremap)
  levels, inverse = distinct_levels(q, threshold_cutoffs(int(q.max()), thresholds))
  gt_boxes = np.asarray(gt_boxes, dtype=np.int64)
  res = None if native is False else _kernel_ious(q, levels, gt_boxes)
  if res is None:
    if native:
      raise RuntimeError(
        f'native=True but the WSOL box kernel is unavailable ({native_kernel.status()}) or '
        f'the map is larger than it handles; map shape {q.shape}'
      )
    res = exact_level_ious(q, levels, gt_boxes)
  return {k: r[inverse] for k, r in zip(('multi', 'largest', 'largest_first'), res)}


def _kernel_ious(q, levels, gt_boxes):
  """Per-level (multi, largest, largest_first) by the compiled kernel, or None."""
  out = native_kernel.level_ious(q, level_lut(levels), len(levels), gt_boxes)
  if out is None:
    return None
  multi, largest, largest_first, flags = out
  zero = box_iou(np.zeros((1, 4), np.int64), gt_boxes)[0]
  empty = (flags & 2) != 0
  multi[empty], largest[empty], largest_first[empty] = zero.max(), zero.max(), zero[0]
  return multi, largest, largest_first


def _level_ious(boxes, areas, counts, gt_boxes):
  """Per level: best IoU of all contours' boxes, IoUs of the (first) largest contour's box."""
  num_levels = len(counts)
  zero = box_iou(np.zeros((1, 4), np.int64), gt_boxes)[0]  # the reference's box of no contour
  multi = np.full(num_levels, zero.max())
  largest = np.full(num_levels, zero.max())
  largest_first = np.full(num_levels, zero[0])
  if len(boxes):
    ious = box_iou(boxes, gt_boxes)
    best = ious.max(axis=1)
    nonempty = np.flatnonzero(counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonempty]
    multi[nonempty] = np.maximum.reduceat(best, starts)
    level_of = np.repeat(np.arange(num_levels), counts)
    seg_max = np.full(num_levels, -1.0)
    seg_max[nonempty] = np.maximum.reduceat(areas, starts)
    cand = np.flatnonzero(areas == seg_max[level_of])
    lv, first = np.unique(level_of[cand], return_index=True)  # first max: Python max() ties
    pick = cand[first]
    largest[lv] = best[pick]
    largest_first[lv] = ious[pick, 0]
  return multi, largest, largest_first
