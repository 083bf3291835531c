"""Per-image contour boxes at every CAM threshold, bit-compatible with wsolevaluation.

The reference (clovaai/wsolevaluation ``compute_bboxes_from_scoremaps``) quantizes a map to
uint8, and for every CAM threshold t (1000 of them at interval 0.001) binarizes it at
``q > int(t * q.max())``, runs ``cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)`` and takes
``boundingRect`` of every contour (multi-contour) or of the one with the largest
``cv2.contourArea`` (first one on ties, as Python's ``max``).

``int(t * qmax)`` takes at most 256 distinct values, and thresholds giving the same level set are
merged (:func:`distinct_levels`). Two exact ways to get every level's contours from there:

- the compiled kernel (:mod:`dualsig_jax.wsol.native`, the default): the level sets are nested,
  so one union-find pass over the pixels holds all levels' components, boxes and contour areas
  without tracing (its cost does not grow with the number of levels or of contours);
  levels where several contours share the largest area are traced, for OpenCV's tie order;
- the traced path (no C compiler, or ``native=False``), described below.

Why the traced path is much faster than the reference and still exact:
- contours are traced once per distinct level set and mapped back to the thresholds;
- each level set is cropped to its own foreground bounding box before tracing (OpenCV pads the
  image with zeros, so the traced contours, their order and their hierarchy are unchanged; the
  ``offset`` argument restores the coordinates);
- ``CHAIN_APPROX_SIMPLE`` as the reference: in this OpenCV build it costs the same as ``NONE``
  and yields ~3x fewer points to reduce (boxes and shoelace areas are those of the reference);
- speckle is removed from every level at once (:func:`despeckle`, one clamp per map): noisy
  maps have tens of thousands of components and holes of 1-3 pixels, whose
  contours cost most of the tracing time but whose boxes are tiny. Their contribution is
  restored exactly: their boxes' IoUs are computed per pixel and merged into the levels where
  they could change the best IoU, and levels where they could matter for the largest contour
  (largest area <= 6, or a tie for the largest, or nothing left) are traced again from the
  original map;
- bounding boxes and areas of all contours of all levels are computed in a few vectorized numpy
  reductions instead of ~1000 Python-level ``boundingRect``/``contourArea`` calls per level.
"""

from __future__ import annotations

import cv2
import numpy as np

from dualsig_jax.wsol import native as native_kernel

__all__ = [
  'quantize',
  'threshold_cutoffs',
  'despeckle',
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


def _window(offsets):
  """(kernel, anchor) for cv2 morphology over ``q[y + dy, x + dx]`` for ``(dy, dx)`` in offsets."""
  dys, dxs = [o[0] for o in offsets], [o[1] for o in offsets]
  kernel = np.zeros((max(dys) - min(dys) + 1, max(dxs) - min(dxs) + 1), np.uint8)
  for dy, dx in offsets:
    kernel[dy - min(dys), dx - min(dxs)] = 1
  return kernel, (-min(dxs), -min(dys))


def _ring(pixels, conn):
  """Offsets of the ``conn``-neighbours of a set of pixel offsets, the set itself excluded."""
  steps = (
    [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]
    if conn == 8
    else [(-1, 0), (1, 0), (0, -1), (0, 1)]
  )
  return sorted({(y + a, x + b) for y, x in pixels for a, b in steps} - set(pixels))


def _small_sets(size, conn):
  """All ``conn``-connected pixel sets of 1..size pixels, as offsets from their raster-first pixel."""
  steps = (
    [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]
    if conn == 8
    else [(-1, 0), (1, 0), (0, -1), (0, 1)]
  )
  found, frontier = set(), {((0, 0),)}
  for _ in range(size):
    found |= frontier
    grown = set()
    for cells in frontier:
      for y, x in cells:
        for a, b in steps:
          new = set(cells) | {(y + a, x + b)}
          if len(new) > len(cells):
            oy, ox = min(new)
            grown.add(tuple(sorted((cy - oy, cx - ox) for cy, cx in new)))
    frontier = grown
  return sorted(found, key=lambda c: (len(c), c))


# Components (8-connected) and holes (4-connected) of at most _SPECKLE pixels, with the window of
# their surrounding ring. _SPECKLE_AREA bounds their contours' cv2.contourArea.
_SPECKLE, _SPECKLE_AREA = 3, 6.0
_SETS = sorted(
  [(True, px, _window(_ring(px, 8))) for px in _small_sets(_SPECKLE, 8)]
  + [(False, px, _window(_ring(px, 4))) for px in _small_sets(_SPECKLE, 4)],
  key=lambda s: len(s[1]),
)
_NOISY = 2000  # see despeckle: how many small speckles make larger ones worth removing


def despeckle(q: np.ndarray, noisy: int = _NOISY):
  """Removes components and holes of up to 3 pixels from every level set at once.

  A pixel set S (8-connected) is a whole 8-connected component of ``q > c`` iff
  ``ring_max(S) <= c < min(q[S])`` (``ring_max``: the maximum over its 8-neighbours, 0 outside
  the image). Since components shrink as c grows, the levels where a pixel's component has at
  most k pixels form one interval ``[c0, q)``, so ``q' = min(q, c0)`` removes exactly those
  components at every level. Likewise holes (4-connected background components, never touching
  the image border) of pixel set S exist exactly on ``[max(q[S]), ring_min(S))``
  (``ring_min``: minimum over its 4-neighbours, 0 off the image) and ``q' = max(q, c1)`` fills
  them. A pixel is never in both cases, a removed component and a filled hole never touch, and
  no other contour passes through them (neither is 4-adjacent to another component's
  background), so every other contour is traced identically (checked by brute force in
  tests/test_wsol_box.py). Single pixels are always removed, sets of 2 only when at least
  ``noisy // 10`` single ones were found, sets of 3 only when at least ``noisy`` smaller ones
  were (exact either way; the extra morphology passes only pay off on noisy maps).

  Args:
    q: uint8 ``[H, W]``.
    noisy: see above (0: always remove all sets up to 3 pixels).
  Returns:
    ``(qc, lo, hi, boxes)``: uint8 ``[H, W]`` cleaned map; int64 ``[N]``, ``[N]``, ``[N, 4]``
    for every removed contour: it exists for cutoffs ``lo <= c < hi``; its reference box
    ``(x, y, min(x + w, W - 1), min(y + h, H - 1))`` of its ``boundingRect``. Each has
    ``cv2.contourArea <= _SPECKLE_AREA``.
  """
  height, width = q.shape
  c0 = np.full(q.shape, 256, np.int16)  # 256: never removed
  c1 = np.zeros(q.shape, np.int16)  # 0: never filled
  los, his, boxes = [], [], []
  for fg, pixels, (kernel, anchor) in _SETS:
    if len(pixels) > 1 and sum(map(len, los)) < (noisy if len(pixels) > 2 else noisy // 10):
      break  # larger sets only pay off on noisy maps (any size limit is exact)
    op = cv2.dilate if fg else cv2.erode
    ring = op(q, kernel, anchor=anchor, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    dys, dxs = [o[0] for o in pixels], [o[1] for o in pixels]
    # Anchors whose whole set lies inside the image (sets reaching outside cannot exist).
    ys = slice(max(0, -min(dys)), height - max(0, max(dys)))
    xs = slice(max(0, -min(dxs)), width - max(0, max(dxs)))
    at = [
      (slice(ys.start + dy, ys.stop + dy), slice(xs.start + dx, xs.stop + dx)) for dy, dx in pixels
    ]
    ring = ring[ys, xs]
    if fg:
      lo, hi = ring, np.minimum.reduce([q[a] for a in at])
    else:
      lo, hi = np.maximum.reduce([q[a] for a in at]), ring
    mask = lo < hi
    if not mask.any():  # cheap test first: smooth maps have few speckles
      continue
    py, px = np.divmod(np.flatnonzero(mask), mask.shape[1])
    hit = (py, px)
    lo, hi = lo[mask].astype(np.int64), hi[mask].astype(np.int64)
    for a in at:  # views: updated in place
      if fg:
        c0[a][hit] = np.minimum(c0[a][hit], lo)
      else:
        c1[a][hit] = np.maximum(c1[a][hit], hi)
    py, px = py + ys.start, px + xs.start
    g = 0 if fg else 1  # a hole's contour runs through its 4-neighbours
    x0, x1 = px + min(dxs) - g, px + max(dxs) + g
    y0, y1 = py + min(dys) - g, py + max(dys) + g
    los.append(lo)
    his.append(hi)
    boxes.append(
      np.stack(
        [x0, y0, np.minimum(x1 + 1, width - 1), np.minimum(y1 + 1, height - 1)], axis=1
      ).astype(np.int64)
    )
  qc = np.minimum(np.maximum(q, c1), c0).astype(np.uint8)
  if not los:
    return qc, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.int64)
  return qc, np.concatenate(los), np.concatenate(his), np.concatenate(boxes)


def level_contours(q: np.ndarray, levels: np.ndarray, mode: int = cv2.RETR_TREE):
  """Boxes and areas of all contours of ``q > c`` for every cutoff ``c`` in ``levels``.

  Args:
    q: uint8 ``[H, W]`` quantized map.
    levels: int64 ``[L]`` cutoffs.
    mode: ``cv2.RETR_TREE`` (the reference's order) or ``cv2.RETR_LIST`` (same contours, other
      order, a little cheaper; only for callers that do not depend on the order).
  Returns:
    ``(boxes, areas, counts)``: int64 ``[K, 4]`` reference boxes ``(x, y, min(x+w, W-1),
    min(y+h, H-1))`` from ``boundingRect``; float64 ``[K]`` ``cv2.contourArea`` values; int64
    ``[L]`` number of contours per level. Contours of one level are contiguous and in
    ``cv2.findContours(mode)`` order; levels in the order given.
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
    found = find(binary, mode, method, offset=(xa, ya))[0]
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
  uniq, inv = np.unique(cutoffs, return_inverse=True)
  above = q.size - np.cumsum(np.bincount(q.ravel(), minlength=256))  # [256]: #(q > c)
  count = above[uniq]
  new = np.ones(len(uniq), bool)
  new[1:] = count[1:] != count[:-1]  # above is non-increasing: equal sets are neighbours
  return uniq[new], (np.cumsum(new) - 1)[inv.reshape(-1)]


def image_box_ious(
  scoremap: np.ndarray, gt_boxes: np.ndarray, thresholds: np.ndarray, native: bool | None = None
):
  """Per-threshold IoUs of one map, as the reference computes them.

  Args:
    scoremap: float ``[H, W]`` in [0, 1] (validated by the caller).
    gt_boxes: int ``[G, 4]`` (x0, y0, x1, y1) in scoremap pixels, G >= 1.
    thresholds: float64 ``[T]`` CAM thresholds.
    native: use the compiled kernel (:mod:`dualsig_jax.wsol.native`): None = when it is
      available, True = required (RuntimeError if not), False = the traced numpy/OpenCV path.
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
        'native=True but the WSOL box kernel is unavailable (see warnings) or the map is larger '
        f'than it handles; map shape {q.shape}'
      )
    res = _traced_ious(q, levels, gt_boxes)
  return {k: r[inverse] for k, r in zip(('multi', 'largest', 'largest_first'), res)}


def _kernel_ious(q, levels, gt_boxes):
  """Per-level (multi, largest, largest_first) by the compiled kernel, or None."""
  lut = np.searchsorted(levels, np.arange(256), side='left').astype(np.int16)  # #levels < value
  out = native_kernel.level_ious(q, lut, len(levels), gt_boxes)
  if out is None:
    return None
  multi, largest, largest_first, flags = out
  zero = box_iou(np.zeros((1, 4), np.int64), gt_boxes)[0]
  empty = (flags & 2) != 0
  multi[empty], largest[empty], largest_first[empty] = zero.max(), zero.max(), zero[0]
  # Largest area shared by several components: the first in OpenCV's order wins; trace.
  tie = np.flatnonzero((flags & 1) != 0)
  if len(tie):
    r = _level_ious(*level_contours(q, levels[tie]), gt_boxes)
    largest[tie], largest_first[tie] = r[1], r[2]
  return multi, largest, largest_first


def _traced_ious(q, levels, gt_boxes):
  """Per-level (multi, largest, largest_first) by tracing the level sets with OpenCV."""
  qc, spk_lo, spk_hi, spk_boxes = despeckle(q, _NOISY)
  # RETR_LIST: the order only matters for ties of the largest area, and those levels are
  # traced again below in the reference's RETR_TREE order.
  multi, largest, largest_first, seg_max, ties, counts = _level_ious(
    *level_contours(qc, levels, cv2.RETR_LIST), gt_boxes
  )
  # Levels whose largest contour might be a removed speckle (area <= _SPECKLE_AREA) or
  # whose tie-break might depend on them: trace the original level set.
  has_fg = int(q.max()) > levels
  redo = has_fg & ((seg_max <= _SPECKLE_AREA) | (ties > 1) | (counts == 0))
  if len(spk_lo):
    spk_iou = box_iou(spk_boxes, gt_boxes).max(axis=1)
    # Only levels where some speckle could beat the best IoU of the traced contours.
    fix = np.flatnonzero(~redo & (multi < spk_iou.max()))
    for f in np.array_split(fix, -(-len(fix) // 32)) if len(fix) else []:  # bounded memory
      keep = spk_iou > multi[f].min()
      lo, hi, val = spk_lo[keep][None], spk_hi[keep][None], spk_iou[keep][None]
      lv = levels[f][:, None]
      best = np.where((lv >= lo) & (lv < hi), val, -1.0).max(axis=1, initial=-1.0)  # [F, P]
      multi[f] = np.maximum(multi[f], best)
  redo = np.flatnonzero(redo)
  if len(redo):
    r = _level_ious(*level_contours(q, levels[redo]), gt_boxes)
    multi[redo], largest[redo], largest_first[redo] = r[0], r[1], r[2]
  return multi, largest, largest_first


def _level_ious(boxes, areas, counts, gt_boxes):
  """Per level: best IoU of all boxes, IoUs of the largest contour, its area, #ties, counts."""
  num_levels = len(counts)
  zero = box_iou(np.zeros((1, 4), np.int64), gt_boxes)[0]
  multi = np.full(num_levels, zero.max())
  largest = np.full(num_levels, zero.max())
  largest_first = np.full(num_levels, zero[0])
  seg_max = np.full(num_levels, -1.0)
  ties = np.zeros(num_levels, np.int64)
  if len(boxes):
    ious = box_iou(boxes, gt_boxes)
    best = ious.max(axis=1)
    nonempty = np.flatnonzero(counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonempty]
    multi[nonempty] = np.maximum.reduceat(best, starts)
    level_of = np.repeat(np.arange(num_levels), counts)
    seg_max[nonempty] = np.maximum.reduceat(areas, starts)
    cand = np.flatnonzero(areas == seg_max[level_of])
    ties = np.bincount(level_of[cand], minlength=num_levels)
    lv, first = np.unique(level_of[cand], return_index=True)  # first max: Python max() ties
    pick = cand[first]
    largest[lv] = best[pick]
    largest_first[lv] = ious[pick, 0]
  return multi, largest, largest_first, seg_max, ties, counts
