"""Boxes and areas of the contours of every level set of a map at once, from component trees.

The level sets ``{q > c}`` of a quantized map are nested: as the cutoff falls, 8-connected
foreground components only appear, grow and merge, and 4-connected background components only
shrink and split. OpenCV's contours of a binary image (``RETR_TREE``) are one outer border per
8-connected foreground component and one hole border per 4-connected background component
that does not reach the image border, so all of them, at all cutoffs, follow from component
trees of the map, with no tracing:

- boxes: the ``boundingRect`` of an outer border is its component's bounding box; the one of a
  hole border is the hole's box grown by one pixel (the border runs through the foreground
  pixels 4-adjacent to the hole; each extreme hole pixel has one beyond it, none lies farther);
- the largest contour: ``cv2.contourArea`` of an outer border (shoelace through its border
  pixels' centres) is ``F4 + F3 / 2``, ``Fk`` the number of 2x2 pixel windows with ``k`` pixels
  in its filled component (the component plus all it encloses). Enclosed contours are strictly
  smaller, so the largest contour is a filled component: a component of an upper level set of
  ``e``, the map with its holes filled (``e(p)``: the lowest level at which ``p`` is background
  connected to the image border).

A tree is built from vectorized steps, no per-pixel Python loop:
1. basins: each pixel points to its highest neighbour if strictly higher (lowest, for
   background), and pointer jumping takes it to a plateau with no higher neighbour. A pixel
   reaches its plateau through pixels at least as high as itself, so at every level the pixels
   of a basin that are present lie in one component;
2. a basin that touches a higher one at its own top is part of it at every level where it has
   pixels: it is merged into one such neighbour (left: one basin per regional maximum);
3. adjacent basins touch up to a pass level; one graph over (basin, level) nodes, joined at every
   level where they touch, has as connected components (``scipy.sparse.csgraph``) exactly the
   components of all level sets.
All of it is in level-index space: with the caller's L sorted cutoffs, value ``q`` becomes
``#{cutoffs < q}``; level ``i`` keeps (foreground) the pixels whose index exceeds ``i``.
Checked against ``cv2.findContours`` / ``cv2.contourArea`` by brute force in the tests.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ['LevelComponents', 'level_components', 'exterior_bound']

_STEPS = {
  4: ((0, 1), (1, 0), (0, -1), (-1, 0)),
  8: ((0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)),
}
# One step of each opposite pair: every adjacent pixel pair once.
_HALF = {4: ((0, 1), (1, 0)), 8: ((0, 1), (1, 0), (1, 1), (1, -1))}
_BIG = 1 << 14  # above any coordinate and level: offsets for segmented cumulative min / max


def _jump(ptr):
  """Pointer jumping to the roots of a forest given as int ``[N]`` parent indices."""
  while True:
    nxt = ptr[ptr]
    if np.array_equal(nxt, ptr):
      return ptr
    ptr = nxt


def _basins(a, conn):
  """Steepest-ascent basins of int16 ``[H, W]`` ``a``: (int64 ``[H*W]`` ids, int64 ``[B]`` tops).

  Ties are broken by raster index (value, index): on a plateau pixels climb towards higher
  indices, so every pixel has one path up and the tops are isolated pixels.
  """
  h, w = a.shape
  n = h * w
  key = a.astype(np.int32) * np.int32(n) + np.arange(n, dtype=np.int32).reshape(h, w)
  pad = np.full((h + 2, w + 2), np.iinfo(np.int32).min, np.int32)
  pad[1:-1, 1:-1] = key
  best = key.copy()
  step = np.zeros((h, w), np.int32)
  for dy, dx in _STEPS[conn]:
    nb = pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    up = np.greater(nb, best)
    np.copyto(best, nb, where=up)
    np.copyto(step, dy * w + dx, where=up)
  flat = step.ravel()
  top = np.flatnonzero(flat == 0)
  root = _jump(np.arange(n, dtype=np.int32) + flat)
  ids = np.zeros(n, np.int64)
  ids[top] = np.arange(len(top))
  return ids[root], a.ravel()[top].astype(np.int64)


def _touching(basin, a, conn):
  """Adjacent pixel pairs in different basins: int64 (basin a, basin b, min of their values)."""
  h, w = a.shape
  b2 = basin.reshape(h, w)
  ea, eb, ew = [], [], []
  for dy, dx in _HALF[conn]:
    s1 = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
    s2 = (slice(dy, h), slice(max(0, dx), w + min(0, dx)))
    ba, bb = b2[s1], b2[s2]
    m = ba != bb
    ea.append(ba[m])
    eb.append(bb[m])
    ew.append(np.minimum(a[s1][m], a[s2][m]))
  return (
    np.concatenate(ea).astype(np.int64),
    np.concatenate(eb).astype(np.int64),
    np.concatenate(ew).astype(np.int64),
  )


def _tree_basins(a, conn):
  """Basins, one per regional maximum, and their pass values.

  Returns ``(basin, tops, ea, eb, ew)``: int64 ``[H*W]`` basin ids, int64 ``[B]`` tops, and one
  edge per adjacent basin pair: both basins have pixels above level ``l`` and touch there iff
  ``l < ew`` (``a``'s values as levels).
  """
  basin, tops = _basins(a, conn)
  nb = len(tops)
  ea, eb, ew = _touching(basin, a, conn)
  # Merge each basin touching a higher (or equal, higher id) one at its own top into it.
  ka, kb = tops[ea] * nb + ea, tops[eb] * nb + eb
  low, high = np.where(ka < kb, ea, eb), np.where(ka < kb, eb, ea)
  top_touch = ew == tops[low]
  parent = np.arange(nb)
  parent[low[top_touch]] = high[top_touch]  # any one of them: a chain of higher keys
  root = _jump(parent)
  is_root = root == np.arange(nb)
  new_id = np.cumsum(is_root) - 1
  basin = new_id[root][basin]
  tops = tops[is_root]
  nb = len(tops)
  ea, eb = new_id[root[ea]], new_id[root[eb]]
  keep = (ea != eb) & (ew > np.iinfo(np.int16).min)
  ea, eb, ew = ea[keep], eb[keep], ew[keep]
  lo, hi = np.minimum(ea, eb), np.maximum(ea, eb)
  # One edge per pair, with its highest pass: sort by (pair, -pass) and keep the first.
  key = np.unique((lo * nb + hi) * (4 * _BIG) + (2 * _BIG - 1 - ew))
  pair = key // (4 * _BIG)
  first = np.ones(len(key), bool)
  first[1:] = pair[1:] != pair[:-1]
  key, pair = key[first], pair[first]
  return basin, tops, pair // nb, pair % nb, 2 * _BIG - 1 - key % (4 * _BIG)


def _seg_cum(x, seg, op, reverse):
  """Cumulative ``op`` (np.minimum / np.maximum) of int64 ``x`` within runs of equal ``seg``
  (non-decreasing), from the end of each run when ``reverse``."""
  if reverse:
    x, seg = x[::-1], seg[-1] - seg[::-1]
  shift = seg * _BIG if op is np.maximum else seg * -_BIG
  out = op.accumulate(x + shift) - shift
  return out[::-1] if reverse else out


class LevelComponents:
  """Every component of every level of one tree (K of them).

  Attributes:
    level: int64 ``[K]`` level index.
    box: int64 ``[K, 4]`` inclusive box (x0, y0, x1, y1) of its pixels.
    area2: int64 ``[K]`` ``2 * F4 + F3`` over 2x2 windows, or None if not asked for.
    hole: bool ``[K]`` background component not connected to the image border (background
      trees only; else None).
    basin: int64 ``[H * W]`` basin of every pixel.
    exterior_level: int64 ``[B]`` background trees: per basin the lowest level from which its
      pixels that are background are connected to the border.
  """

  def __init__(self, level, box, area2, hole, basin, exterior_level):
    self.level, self.box, self.area2, self.hole = level, box, area2, hole
    self.basin, self.exterior_level = basin, exterior_level


def exterior_bound(v: np.ndarray) -> np.ndarray:
  """Levels from which each pixel is surely background connected to the border.

  The minimum over the 4 straight rays to the border of the ray's maximum (background at level
  ``l`` is ``v <= l``). Cuts the background graph short (see :func:`level_components`).
  """
  m = np.minimum(np.maximum.accumulate(v, axis=1), np.maximum.accumulate(v[:, ::-1], axis=1)[:, ::-1])
  np.minimum(m, np.maximum.accumulate(v, axis=0), out=m)
  np.minimum(m, np.maximum.accumulate(v[::-1], axis=0)[::-1], out=m)
  return m


def level_components(v, num_levels, fg=True, areas=False):
  """All components of all level sets of ``v``.

  Args:
    v: int16 ``[H, W]`` level indices in ``[0, num_levels]``.
    num_levels: L.
    fg: foreground (``v > l``, 8-connected) or background (``v <= l``, 4-connected, with holes
      told apart from the exterior) components, for every level ``l`` in ``[0, L)``.
    areas: also each component's ``2 * F4 + F3`` (foreground only).
  Returns:
    :class:`LevelComponents`.
  """
  h, w = v.shape
  conn = 8 if fg else 4
  # Background is handled as the foreground of -v: level l keeps -v > -l - 1.
  basin, tops, ea, eb, ew = _tree_basins(v if fg else -v, conn)
  nb = len(tops)
  flat_v = v.ravel().astype(np.int64)
  if fg:
    lo, hi = np.zeros(nb, np.int64), tops
    es, et = np.zeros_like(ew), ew
  else:
    # Basin present from its bottom level; past its exterior bound it is known to be exterior,
    # and its nodes there are replaced by one exterior node per level.
    lo = -tops
    hi = np.full(nb, num_levels, np.int64)
    np.minimum.at(hi, basin, exterior_bound(v).ravel().astype(np.int64))
    hi = np.maximum(hi, lo)
    es, et = -ew, np.maximum(hi[ea], hi[eb])
  size = hi - lo
  off = np.zeros(nb + 1, np.int64)
  np.cumsum(size, out=off[1:])
  num_nodes = int(off[-1])

  cnt = np.maximum(et - es, 0)
  total = int(cnt.sum())
  start = np.cumsum(cnt) - cnt
  ramp = np.arange(total, dtype=np.int64)
  if fg:
    na = ramp + np.repeat(off[ea] - lo[ea] + es - start, cnt)
    nb_ = ramp + np.repeat(off[eb] - lo[eb] + es - start, cnt)
    num_all = num_nodes
  else:
    lvl = ramp + np.repeat(es - start, cnt)
    ha, hb = np.repeat(hi[ea], cnt), np.repeat(hi[eb], cnt)
    na = np.where(lvl < ha, lvl + np.repeat(off[ea] - lo[ea], cnt), num_nodes + lvl)
    nb_ = np.where(lvl < hb, lvl + np.repeat(off[eb] - lo[eb], cnt), num_nodes + lvl)
    num_all = num_nodes + num_levels
  graph = coo_matrix((np.ones(total, np.int8), (na, nb_)), shape=(num_all, num_all))
  num_groups, labels = connected_components(graph, directed=True, connection='weak')
  labels = labels.astype(np.int64)
  node_labels = labels[:num_nodes]
  node_basin = np.repeat(np.arange(nb), size)
  node_level = np.arange(num_nodes) - off[node_basin] + lo[node_basin]

  # Box of each node: its basin's pixels present at its level. Each pixel is put at its extreme
  # level (highest for foreground), then boxes accumulate along the levels.
  if fg:
    keep = flat_v > 0
    at = off[basin] + flat_v - 1
  else:
    keep = flat_v < hi[basin]
    at = off[basin] + flat_v - lo[basin]
  ys, xs = _coords(h, w)
  at, px, py = at[keep], xs[keep], ys[keep]
  box = np.empty((4, num_nodes), np.int64)
  box[:2] = _BIG - 1
  box[2:] = -1
  for k, (op, c) in enumerate(((np.minimum, px), (np.minimum, py), (np.maximum, px), (np.maximum, py))):
    op.at(box[k], at, c)
    box[k] = _seg_cum(box[k], node_basin, op, reverse=fg)
  gbox = np.empty((4, num_groups), np.int64)
  gbox[:2] = _BIG - 1
  gbox[2:] = -1
  for k, op in enumerate((np.minimum, np.minimum, np.maximum, np.maximum)):
    op.at(gbox[k], node_labels, box[k])
  glevel = np.full(num_groups, -1, np.int64)
  glevel[node_labels] = node_level
  real = glevel >= 0  # groups with a basin node (not exterior-only ones)

  hole = exterior_level = None
  if not fg:
    ext = np.zeros(num_groups, bool)
    ext[labels[num_nodes:]] = True
    hole = ~ext[real]
    # Being exterior is monotone in the level: exterior from lo + #non-exterior nodes on.
    exterior_level = lo + np.bincount(node_basin[~ext[node_labels]], minlength=nb)
  area2 = None
  if areas:
    area2 = np.bincount(node_labels, _node_areas(v, basin, off, num_nodes), num_groups)
    area2 = area2[real].astype(np.int64)
  return LevelComponents(glevel[real], gbox[:, real].T, area2, hole, basin, exterior_level)


_COORDS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _coords(h, w):
  if (h, w) not in _COORDS:
    if len(_COORDS) > 8:
      _COORDS.clear()
    ys, xs = np.divmod(np.arange(h * w, dtype=np.int64), w)
    _COORDS[h, w] = ys, xs
  return _COORDS[h, w]


def _node_areas(v, basin, off, num_nodes):
  """``2 * F4 + F3`` of every foreground node (nodes of a basin from level 0 up).

  A 2x2 window whose two lowest values are e1 <= e2 has its 4 pixels above level l for l < e1
  and 3 for e1 <= l < e2, all in the component of its highest pixel: +1 on both ranges, summed
  from the top level down.
  """
  h, w = v.shape
  p00, p01, p10, p11 = v[:-1, :-1], v[:-1, 1:], v[1:, :-1], v[1:, 1:]
  lo1, hi1 = np.minimum(p00, p01), np.maximum(p00, p01)
  lo2, hi2 = np.minimum(p10, p11), np.maximum(p10, p11)
  e1 = np.minimum(lo1, lo2).ravel()
  e2 = np.minimum(np.maximum(lo1, lo2), np.minimum(hi1, hi2)).ravel()
  # Basin of a highest pixel of each window (the top row's if it holds the maximum).
  bw = basin.reshape(h, w)
  top_row = (hi1 >= hi2).ravel()
  left_top = (p00 >= p01).ravel()
  left_bot = (p10 >= p11).ravel()
  b_top = np.where(left_top, bw[:-1, :-1].ravel(), bw[:-1, 1:].ravel())
  b_bot = np.where(left_bot, bw[1:, :-1].ravel(), bw[1:, 1:].ravel())
  b = np.where(top_row, b_top, b_bot)
  base = off[b] - 1
  add = np.bincount(
    np.concatenate([(base + e1)[e1 > 0], (base + e2)[e2 > 0]]), minlength=num_nodes + 1
  )[:num_nodes]
  # Sum within each basin's run of nodes from its highest level down.
  rc = np.cumsum(add[::-1])[::-1]
  tail = np.append(rc, 0)[off[1:]]  # the sum beyond each basin's run
  node_basin_tail = np.repeat(tail, np.diff(off))
  return rc - node_basin_tail
