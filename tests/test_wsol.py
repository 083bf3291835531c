"""WSOL evaluator: exactness against a literal per-threshold OpenCV port of wsolevaluation."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from dualsig_jax.wsol import BoxEvaluator, MaskEvaluator, image_box_ious
from dualsig_jax.wsol import levels as levels_mod
from dualsig_jax.wsol.cli import main as cli_main
from dualsig_jax.wsol.levels import _SPECKLE_AREA, despeckle, quantize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# Reference: a straightforward port of wsolevaluation (evaluation.py, MaxBoxAccV2 version).
# --------------------------------------------------------------------------------------------
def ref_boxes_at_thresholds(scoremap, thresholds):
  """Per threshold: (all contours' boxes, largest contour's box), literally as the reference."""
  height, width = scoremap.shape
  image = np.expand_dims((scoremap.astype(np.float64) * 255).astype(np.uint8), 2)
  multi, largest = [], []
  for t in thresholds:
    _, binary = cv2.threshold(
      src=image, thresh=int(t * np.max(image)), maxval=255, type=cv2.THRESH_BINARY
    )
    contours = cv2.findContours(image=binary, mode=cv2.RETR_TREE, method=cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
      multi.append(np.asarray([[0, 0, 0, 0]]))
      largest.append(np.asarray([[0, 0, 0, 0]]))
      continue
    boxes = []
    for c in list(contours) + [max(contours, key=cv2.contourArea)]:
      x, y, w, h = cv2.boundingRect(c)
      boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    multi.append(np.asarray(boxes[:-1]))
    largest.append(np.asarray(boxes[-1:]))
  return multi, largest


def ref_multiple_iou(box_a, box_b):
  num_a, num_b = box_a.shape[0], box_b.shape[0]
  box_a = np.expand_dims(np.tile(box_a, num_b), axis=1).reshape((num_a, num_b, -1))
  box_b = np.transpose(
    np.expand_dims(np.tile(box_b, num_a), axis=1).reshape((num_b, num_a, -1)), (1, 0, 2)
  )
  min_x = np.maximum(box_a[:, :, 0], box_b[:, :, 0])
  min_y = np.maximum(box_a[:, :, 1], box_b[:, :, 1])
  max_x = np.minimum(box_a[:, :, 2], box_b[:, :, 2])
  max_y = np.minimum(box_a[:, :, 3], box_b[:, :, 3])
  inter = np.maximum(0, max_x - min_x + 1) * np.maximum(0, max_y - min_y + 1)
  area_a = (box_a[:, :, 2] - box_a[:, :, 0] + 1) * (box_a[:, :, 3] - box_a[:, :, 1] + 1)
  area_b = (box_b[:, :, 2] - box_b[:, :, 0] + 1) * (box_b[:, :, 3] - box_b[:, :, 1] + 1)
  denom = area_a + area_b - inter
  deg = np.where(denom <= 0)
  denom[deg] = 1
  ious = inter / denom
  ious[deg] = 0
  return ious


def ref_image_ious(scoremap, gt, thresholds):
  multi, largest = ref_boxes_at_thresholds(scoremap, thresholds)
  gt = np.asarray(gt)
  out = {'multi': [], 'largest': [], 'largest_first': []}
  for mb, lb in zip(multi, largest):
    out['multi'].append(ref_multiple_iou(mb, gt).max(1).max())
    li = ref_multiple_iou(lb, gt)
    out['largest'].append(li.max(1).max())
    out['largest_first'].append(li[0, 0])
  return {k: np.asarray(v) for k, v in out.items()}


class RefBoxEvaluator:
  """wsolevaluation's BoxEvaluator (+ GT-known / Top-1 Loc: largest contour vs first GT box)."""

  def __init__(self, ious, interval, multi, loc_threshold=0.2):
    self.ious, self.multi = list(ious), multi
    self.thr = list(np.arange(0, 1, interval))
    self.loc = int(np.argmin(np.abs(np.asarray(self.thr) - loc_threshold)))
    z = lambda: {i: np.zeros(len(self.thr)) for i in self.ious}  # noqa: E731
    self.box, self.v1, self.gt_known, self.top1 = z(), np.zeros(len(self.thr)), z(), z()
    self.cnt = 0

  def accumulate(self, r, correct):
    """r: ``ref_image_ious`` of one image at this evaluator's thresholds."""
    sliced = r['multi'] if self.multi else r['largest']
    for i in self.ious:
      self.box[i][np.where(sliced >= (i / 100))[0]] += 1
      hit = r['largest_first'] >= (i / 100)
      self.gt_known[i][hit] += 1
      if correct:
        self.top1[i][hit] += 1
    self.v1[r['largest'] >= 0.5] += 1
    self.cnt += 1

  def compute(self):
    mx = {str(i): (self.box[i] * 100.0 / float(self.cnt)).max() for i in self.ious}
    return {
      'maxboxacc': mx,
      'maxboxacc_v2': np.average([mx[str(i)] for i in self.ious]),
      'maxboxacc_v1': (self.v1 * 100.0 / float(self.cnt)).max(),
      'gt_known_loc': {
        str(i): self.gt_known[i][self.loc] * 100.0 / float(self.cnt) for i in self.ious
      },
      'top1_loc': {str(i): self.top1[i][self.loc] * 100.0 / float(self.cnt) for i in self.ious},
    }


def ref_pxap(maps, masks, interval):
  thr = list(np.arange(0, 1, interval))
  edges = np.append(thr, [1.0, 2.0, 3.0])
  t_hist = np.zeros(len(thr) + 2, dtype=np.float64)
  f_hist = np.zeros(len(thr) + 2, dtype=np.float64)
  for m, g in zip(maps, masks):
    m = m.astype(np.float64)
    t_hist += np.histogram(m[g == 1], bins=edges)[0].astype(np.float64)
    f_hist += np.histogram(m[g == 0], bins=edges)[0].astype(np.float64)
  tp = t_hist[::-1].cumsum()
  fn = t_hist.sum() - tp
  fp = f_hist[::-1].cumsum()
  non_zero = (tp + fp) != 0
  with np.errstate(divide='ignore', invalid='ignore'):
    precision, recall = tp / (tp + fp), tp / (tp + fn)
  return (precision[1:] * np.diff(recall))[non_zero[1:]].sum() * 100


# --------------------------------------------------------------------------------------------
# Map generators.
# --------------------------------------------------------------------------------------------
def _norm(m):
  m = m.astype(np.float64)
  m = m - m.min()
  return (m / m.max() if m.max() > 0 else m).astype(np.float32)


MAP_KINDS = ('lowres_noise', 'blobs', 'rings', 'lines', 'sparse', 'peaked', 'speckle')


def realistic_map(rng, size=224, kind=None):
  """A float32 ``[size, size]`` map in [0, 1] of ``MAP_KINDS[kind]`` (random kind if None)."""
  kind = rng.integers(0, 7) if kind is None else kind
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  if kind == 0:  # bicubic-upsampled low-res noise (CAM-like)
    r = int(rng.choice([3, 4, 7, 14, 28]))
    m = cv2.resize(
      rng.random((r, r)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
  elif kind == 1:  # gaussian blobs
    m = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(1, 5)):
      cy, cx, s = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(5, 50)
      m += rng.uniform(0.3, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
  elif kind == 2:  # rings (holes), possibly several, plus low noise
    m = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(1, 3)):
      cy, cx = rng.uniform(40, size - 40), rng.uniform(40, size - 40)
      rad, wid = rng.uniform(10, 60), rng.uniform(2, 10)
      d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
      m += np.exp(-((d - rad) ** 2) / (2 * wid * wid))
    m += 0.2 * cv2.resize(
      rng.random((7, 7)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
  elif kind == 3:  # thin lines on a faint background
    m = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(1, 6)):
      p0 = tuple(int(v) for v in rng.integers(0, size, 2))
      p1 = tuple(int(v) for v in rng.integers(0, size, 2))
      cv2.line(m, p0, p1, float(rng.uniform(0.3, 1)), int(rng.integers(1, 3)))
    m += 0.1 * rng.random((size, size)).astype(np.float32) * (rng.random() < 0.5)
  elif kind == 4:  # sparse: thresholded CAM (many zeros, sharp edges)
    m = cv2.resize(
      rng.random((7, 7)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    m = np.where(m > np.quantile(m, rng.uniform(0.5, 0.95)), m, 0)
  elif kind == 5:  # peaked CAM (gamma) with plateaus from coarse quantization
    m = cv2.resize(
      rng.random((14, 14)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    m = _norm(m) ** rng.uniform(1, 4)
    m = np.round(m * rng.integers(4, 40)) / 40
  else:  # speckle: high-frequency noise (many tiny contours, area ties)
    m = cv2.resize(
      rng.random((56, 56)).astype(np.float32),
      (size, size),
      interpolation=cv2.INTER_NEAREST if rng.random() < 0.5 else cv2.INTER_CUBIC,
    )
  return _norm(m)


def gt_boxes_near(rng, m):
  size = m.shape[0]
  q = m > rng.uniform(0.3, 0.9) * m.max() if m.max() > 0 else np.ones_like(m, bool)
  ys, xs = np.nonzero(q)
  boxes = []
  for _ in range(rng.integers(1, 4)):
    j = rng.integers(-15, 16, 4)
    x0, y0 = np.clip([xs.min() + j[0], ys.min() + j[1]], 0, size - 1)
    x1, y1 = np.clip([xs.max() + j[2], ys.max() + j[3]], 0, size - 1)
    boxes.append([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)])
  return np.asarray(boxes, dtype=np.int64)


def _assert_same(a, b, path=''):
  if isinstance(a, dict):
    for k in b:
      _assert_same(a[k], b[k], f'{path}.{k}')
  else:
    assert abs(float(a) - float(b)) <= 1e-9, (path, a, b)


# --------------------------------------------------------------------------------------------
# Hand-made maps.
# --------------------------------------------------------------------------------------------
def _hand_maps():
  yy, xx = np.mgrid[:64, :64].astype(np.float32)
  uni = np.exp(-((yy - 30) ** 2 + (xx - 20) ** 2) / 200.0)
  blobs = np.exp(-((yy - 15) ** 2 + (xx - 15) ** 2) / 30.0) + 0.7 * np.exp(
    -((yy - 45) ** 2 + (xx - 50) ** 2) / 20.0
  )
  d = np.sqrt((yy - 32) ** 2 + (xx - 32) ** 2)
  ring = np.exp(-((d - 15) ** 2) / 8.0)
  lines = np.zeros((64, 64), np.float32)
  cv2.line(lines, (3, 5), (60, 5), 1.0, 1)
  cv2.line(lines, (10, 20), (40, 50), 0.8, 1)
  lines[63, :] = 0.5  # touches the image border
  return {
    'unimodal': _norm(uni),
    'blobs': _norm(blobs),
    'ring': _norm(ring),
    'lines': _norm(lines),
    'zeros': np.zeros((64, 64), np.float32),
  }


@pytest.mark.parametrize('name', ['unimodal', 'blobs', 'ring', 'lines', 'zeros'])
def test_hand_made_maps_match_opencv(name):
  m = _hand_maps()[name]
  gt = np.array([[10, 10, 40, 50], [40, 40, 60, 60]])
  thr = np.arange(0, 1, 0.001)
  got = image_box_ious(m, gt, thr)
  want = ref_image_ious(m, gt, thr)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=f'{name}/{k}')


def test_hand_made_boxes_are_what_we_expect():
  """Boxes we can reason about, read off the OpenCV expectations."""
  maps = _hand_maps()
  thr = [0.5]
  # Ring at 0.5: one outer contour and one hole; both boxes present in the multi set.
  multi, largest = ref_boxes_at_thresholds(maps['ring'], thr)
  assert len(multi[0]) == 2
  outer, hole = sorted(multi[0].tolist(), key=lambda b: b[0])
  assert outer[0] < hole[0] and hole[2] < outer[2]
  np.testing.assert_array_equal(largest[0][0], outer)
  # Multi-contour picks the hole's box when it matches the GT better than the outer box.
  gt_hole = np.array([hole])
  r = image_box_ious(maps['ring'], gt_hole, np.array([0.5]))
  assert r['multi'][0] == 1.0 and r['largest'][0] < 1.0
  # All-zero map: every threshold gives the box (0, 0, 0, 0).
  r = image_box_ious(maps['zeros'], np.array([[0, 0, 0, 0]]), np.arange(0, 1, 0.1))
  np.testing.assert_array_equal(r['multi'], 1.0)
  # A horizontal 1-pixel line: box is (x0, y, x1 + 1, y + 1) (boundingRect w/h, not clipped).
  m = np.zeros((20, 30), np.float32)
  m[5, 3:11] = 1.0
  r = image_box_ious(m, np.array([[3, 5, 11, 6]]), np.array([0.5]))
  assert r['largest'][0] == 1.0
  # Clipping to (W-1, H-1) when the object touches the right/bottom border.
  m = np.zeros((20, 30), np.float32)
  m[10:, 20:] = 1.0
  r = image_box_ious(m, np.array([[20, 10, 29, 19]]), np.array([0.5]))
  assert r['largest'][0] == 1.0


def _contour_multiset(binary):
  """{(reference box, cv2.contourArea): count} of a binary image's RETR_TREE contours."""
  height, width = binary.shape
  out = {}
  for c in cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]:
    x, y, w, h = cv2.boundingRect(c)
    key = ((x, y, min(x + w, width - 1), min(y + h, height - 1)), cv2.contourArea(c))
    out[key] = out.get(key, 0) + 1
  return out


def test_despeckle_removes_exactly_the_small_contours():
  """At every cutoff, contours(q) = contours(despeckled) + the reported speckles (small areas)."""
  rng = np.random.default_rng(21)
  qs = [
    rng.integers(0, rng.integers(2, 256), (rng.integers(3, 24), rng.integers(3, 24))).astype(
      np.uint8
    )
    for _ in range(12)
  ]
  qs += [quantize(realistic_map(rng, size=48, kind=k)) for k in (3, 6, 6, 0)]
  removed_any = 0
  for q, noisy in [(q, n) for q in qs for n in (0, 10**9)]:  # with / without 3-pixel sets
    qc, lo, hi, boxes = despeckle(q, noisy=noisy)
    for c in range(int(q.max())):
      full = _contour_multiset((q > c).view(np.uint8))
      kept = _contour_multiset((qc > c).view(np.uint8))
      rest = dict(full)
      for k, n in kept.items():
        assert rest.get(k, 0) >= n, (c, k)  # nothing new appears
        rest[k] -= n
      gone = sorted(k for k, n in rest.items() for _ in range(n))
      assert all(area <= _SPECKLE_AREA for _, area in gone)
      active = (lo <= c) & (c < hi)
      assert sorted(box for box, _ in gone) == sorted(map(tuple, boxes[active].tolist())), c
      removed_any += len(gone)
  assert removed_any > 100


def test_speckle_shortcut_edge_cases():
  """Best box from a removed speckle, hole speckles, levels of speckles only, area ties."""
  thr = np.arange(0, 1, 0.001)
  m = np.zeros((40, 50), np.float32)
  m[20:35, 20:45] = 0.6
  m[5, 5] = 1.0  # isolated pixel
  m[5, 9:11] = 0.9  # isolated horizontal pair
  m[12, 12], m[13, 13] = 0.8, 0.8  # isolated diagonal pair
  m[27, 30] = 0.0  # one-pixel hole
  m[25, 36:38] = 0.1  # two-pixel hole
  gts = [
    [[5, 5, 6, 6]],
    [[9, 5, 11, 6]],
    [[12, 12, 14, 14]],
    [[29, 26, 32, 29]],
    [[35, 24, 39, 27]],
    [[20, 20, 45, 35], [5, 5, 6, 6]],
  ]
  for gt in gts:
    gt = np.array(gt)
    got, want = image_box_ious(m, gt, thr), ref_image_ious(m, gt, thr)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f'{gt.tolist()} {k}')
    assert want['multi'].max() == 1.0  # the speckle's own box is found
  # Only speckles (every level redone from the original map), and equal-area twins (ties).
  rng = np.random.default_rng(3)
  sp = np.zeros((30, 30), np.float32)
  sp[rng.integers(0, 30, 40), rng.integers(0, 30, 40)] = rng.random(40).astype(np.float32)
  tw = np.zeros((30, 30), np.float32)
  tw[3:8, 3:8] = 0.5
  tw[15:20, 20:25] = 0.5
  tw[25, 2] = 1.0
  for mm in (sp, tw):
    gt = np.array([[2, 2, 9, 9], [20, 15, 26, 21]])
    got, want = image_box_ious(mm, gt, thr), ref_image_ious(mm, gt, thr)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize('noisy', [0, 10**9])
def test_box_parity_speckle_maps_tiny_gt(noisy, monkeypatch):
  """Noisy maps (most contours removed as speckle), GT boxes small enough for speckles to win;
  with and without the 3-pixel speckle sets."""
  monkeypatch.setattr(levels_mod, '_NOISY', noisy)
  rng = np.random.default_rng(99)
  thr = np.arange(0, 1, 0.001)
  for i in range(8):
    m = realistic_map(rng, size=96, kind=(3, 6)[i % 2])
    gt = gt_boxes_near(rng, m)
    y, x = rng.integers(1, 90, 2)
    gt = np.concatenate([gt, [[x, y, x + rng.integers(0, 3), y + rng.integers(0, 3)]]])
    got, want = image_box_ious(m, gt, thr), ref_image_ious(m, gt, thr)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f'{i} {k}')


# --------------------------------------------------------------------------------------------
# Parity on realistic maps.
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def realistic():
  rng = np.random.default_rng(1234)
  maps = [realistic_map(rng) for _ in range(240)]
  gts = [gt_boxes_near(rng, m) for m in maps]
  correct = rng.random(len(maps)) < 0.7
  return maps, gts, correct


@pytest.fixture(scope='module')
def realistic_ref(realistic):
  """Reference per-threshold IoUs at interval 0.01, computed once for both parity tests."""
  maps, gts, _ = realistic
  thr = list(np.arange(0, 1, 0.01))
  return [ref_image_ious(m, g, thr) for m, g in zip(maps, gts)]


@pytest.mark.parametrize('multi', [True, False])
def test_box_parity_realistic(realistic, realistic_ref, multi):
  maps, gts, correct = realistic
  interval = 0.01
  ev = BoxEvaluator((30, 50, 70), interval, multi, 0.2, num_workers=0)
  ref = RefBoxEvaluator((30, 50, 70), interval, multi)
  for i in range(0, len(maps), 16):
    ev.accumulate(np.stack(maps[i : i + 16]), gts[i : i + 16], correct[i : i + 16])
  for r, c in zip(realistic_ref, correct):
    ref.accumulate(r, c)
  _assert_same(ev.compute(), ref.compute())


def test_box_parity_fine_interval_and_per_image(realistic):
  """interval 0.001 (every cutoff 0..254) on every 12th map; per-threshold IoUs identical."""
  maps, gts, correct = realistic
  thr = np.arange(0, 1, 0.001)
  ev = BoxEvaluator((30, 50, 70), 0.001, True, 0.2, num_workers=0)
  ref = RefBoxEvaluator((30, 50, 70), 0.001, True)
  for m, g, c in list(zip(maps, gts, correct))[::12]:
    got, want = image_box_ious(m, g, thr), ref_image_ious(m, g, thr)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
    ev.accumulate(m[None], [g], [c])
    ref.accumulate(want, c)
  _assert_same(ev.compute(), ref.compute())


def test_box_parity_float64_and_odd_sizes():
  rng = np.random.default_rng(7)
  for shape in [(37, 53), (5, 5), (1, 9), (224, 224)]:
    m = cv2.resize(rng.random((4, 4)), shape[::-1], interpolation=cv2.INTER_CUBIC)
    m = _norm(m).astype(np.float64)
    gt = np.array([[0, 0, shape[1] // 2, shape[0] // 2]])
    thr = np.arange(0, 1, 0.01)
    got, want = image_box_ious(m, gt, thr), ref_image_ious(m, gt, thr)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=str(shape))


def test_process_pool_matches_inline(realistic):
  maps, gts, correct = realistic
  a = BoxEvaluator(cam_curve_interval=0.01, num_workers=0)
  b = BoxEvaluator(cam_curve_interval=0.01, num_workers=2)
  batch = np.stack(maps[:12])
  a.accumulate(batch, gts[:12], correct[:12])
  b.accumulate(batch, gts[:12], correct[:12])
  assert a.compute() == b.compute()


def test_mask_parity_realistic(realistic):
  maps, _, _ = realistic
  rng = np.random.default_rng(5)
  masks = []
  for m in maps[:120]:
    g = (m > rng.uniform(0.2, 0.8)).astype(np.uint8)
    ign = np.zeros_like(g, bool)
    y, x = rng.integers(0, 180, 2)
    ign[y : y + 40, x : x + 40] = True
    g[ign & (g == 0)] = 255
    masks.append(g)
  for interval in (0.01, 0.001):
    ev = MaskEvaluator(interval)
    for i in range(0, 120, 10):
      ev.accumulate(np.stack(maps[i : i + 10]), np.stack(masks[i : i + 10]))
    assert abs(ev.compute()['pxap'] - ref_pxap(maps[:120], masks, interval)) <= 1e-9
  # Scores exactly on bin edges, 1.0 and 0.0.
  edgy = np.tile(np.append(np.arange(0, 1, 0.01), 1.0)[None], (101, 1)).astype(np.float64)
  g = (np.arange(101)[:, None] % 3 == 0).astype(np.uint8) * np.ones((1, 101), np.uint8)
  ev = MaskEvaluator(0.01)
  ev.accumulate(edgy[None], g[None])
  assert abs(ev.compute()['pxap'] - ref_pxap([edgy], [g], 0.01)) <= 1e-9


def test_bad_inputs_raise():
  ev = BoxEvaluator(num_workers=0)
  ok = np.zeros((1, 8, 8), np.float32)
  with pytest.raises(ValueError, match='NaN'):
    ev.accumulate(np.full((1, 8, 8), np.nan, np.float32), [np.array([[0, 0, 1, 1]])])
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    ev.accumulate(ok + 2, [np.array([[0, 0, 1, 1]])])
  with pytest.raises(ValueError, match='B, H, W'):
    ev.accumulate(ok[0], [np.array([[0, 0, 1, 1]])])
  with pytest.raises(ValueError, match='convention'):
    ev.accumulate(ok, [np.array([[5, 0, 1, 1]])])
  with pytest.raises(ValueError, match='iou_threshold_list'):
    BoxEvaluator(iou_threshold_list=(0,))
  with pytest.raises(ValueError, match='0, 1, 255'):
    MaskEvaluator(0.01).accumulate(ok, np.full((1, 8, 8), 7, np.uint8))


# --------------------------------------------------------------------------------------------
# CLI end to end.
# --------------------------------------------------------------------------------------------
def _write(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


@pytest.fixture()
def box_dataset(tmp_path, realistic):
  maps, _, correct = realistic
  rng = np.random.default_rng(3)
  meta = tmp_path / 'meta' / 'TOY' / 'test'
  ids, sizes, locs, gts = [], [], [], []
  for i, m in enumerate(maps[:20]):
    iid = f'cls{i % 3}/img_{i}.jpg'
    w, h = int(rng.integers(100, 500)), int(rng.integers(100, 500))
    ids.append(iid)
    sizes.append(f'{iid},{w},{h}')
    boxes = gt_boxes_near(rng, m)
    orig = []
    for b in boxes:  # to original pixels; the CLI maps back with int(x * 224 / w)
      o = [int(b[0] * w / 224), int(b[1] * h / 224), int(b[2] * w / 224), int(b[3] * h / 224)]
      orig.append(o)
      locs.append(f'{iid},{o[0]},{o[1]},{o[2]},{o[3]}')
    gts.append(
      np.array(
        [
          [int(x * 224.0 / w), int(y * 224.0 / h), int(x1 * 224.0 / w), int(y1 * 224.0 / h)]
          for x, y, x1, y1 in orig
        ]
      )
    )
    os.makedirs(tmp_path / 'maps' / os.path.dirname(iid), exist_ok=True)
    np.save(tmp_path / 'maps' / (iid + '.npy'), m)
  _write(str(meta / 'image_ids.txt'), ids)
  _write(str(meta / 'image_sizes.txt'), sizes)
  _write(str(meta / 'localization.txt'), locs)
  _write(str(meta / 'class_labels.txt'), [f'{i},0' for i in ids])
  return tmp_path, ids, maps[:20], gts


def test_cli_boxes_end_to_end(box_dataset):
  root, ids, maps, gts = box_dataset
  out = root / 'out.json'
  rc = cli_main(
    [
      '--scoremap_root',
      str(root / 'maps'),
      '--metadata_root',
      str(root / 'meta'),
      '--dataset_name',
      'TOY',
      '--split',
      'test',
      '--cam_curve_interval',
      '0.01',
      '--output_json',
      str(out),
      '--no_progress',
      '--num_workers',
      '0',
    ]
  )
  assert rc == 0
  got = json.loads(out.read_text())
  ref = RefBoxEvaluator((30, 50, 70), 0.01, True)
  for m, g in zip(maps, gts):
    ref.accumulate(ref_image_ious(m, g, ref.thr), True)
  want = ref.compute()
  assert got['num_images'] == 20
  for k in ('maxboxacc', 'maxboxacc_v2', 'maxboxacc_v1', 'gt_known_loc'):
    _assert_same(got[k], want[k], k)


def test_cli_subprocess_largest_contour(box_dataset):
  root, _, maps, gts = box_dataset
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'dualsig_jax.wsol',
      '--scoremap_root',
      str(root / 'maps'),
      '--metadata_root',
      str(root / 'meta'),
      '--dataset_name',
      'TOY',
      '--split',
      'test',
      '--cam_curve_interval',
      '0.01',
      '--multi_contour_eval',
      'false',
      '--iou_threshold_list',
      '50',
      '--num_workers',
      '0',
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  got = json.loads(proc.stdout)
  ref = RefBoxEvaluator((50,), 0.01, False)
  for m, g in zip(maps, gts):
    ref.accumulate(ref_image_ious(m, g, ref.thr), True)
  _assert_same(got['maxboxacc'], ref.compute()['maxboxacc'])


@pytest.mark.parametrize('bad', ['missing', '3d', 'nan', 'range'])
def test_cli_bad_map_names_the_file(box_dataset, bad, capsys):
  root, ids, _, _ = box_dataset
  f = root / 'maps' / (ids[4] + '.npy')
  if bad == 'missing':
    os.remove(f)
  else:
    m = np.load(f)
    m = {'3d': m[None], 'nan': np.where(m > 0.5, np.nan, m), 'range': m * 1.5}[bad]
    np.save(f, m)
  rc = cli_main(
    [
      '--scoremap_root',
      str(root / 'maps'),
      '--metadata_root',
      str(root / 'meta'),
      '--dataset_name',
      'TOY',
      '--split',
      'test',
      '--cam_curve_interval',
      '0.01',
      '--no_progress',
      '--num_workers',
      '0',
    ]
  )
  assert rc == 2
  assert str(f) in capsys.readouterr().err


def test_cli_masks_end_to_end(tmp_path, realistic):
  maps = realistic[0][:10]
  rng = np.random.default_rng(11)
  meta = tmp_path / 'meta' / 'OpenImages' / 'test'
  ids, locs, gt_masks = [], [], []
  for i, m in enumerate(maps):
    iid = f'test/c/{i}.jpg'
    ids.append(iid)
    h, w = int(rng.integers(150, 400)), int(rng.integers(150, 400))
    big = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
    inst = [(big > 0.6).astype(np.uint8) * 255, (big < 0.05).astype(np.uint8) * 255]
    ign = np.zeros((h, w), np.uint8)
    ign[: h // 3, : w // 3] = 255
    paths = [f'test/c/{i}_m{k}.png' for k in range(2)]
    for p, im in zip(paths, inst):
      os.makedirs(tmp_path / 'masks' / os.path.dirname(p), exist_ok=True)
      cv2.imwrite(str(tmp_path / 'masks' / p), im)
    cv2.imwrite(str(tmp_path / 'masks' / f'test/c/{i}_ignore.png'), ign)
    locs.append(f'{iid},{paths[0]},test/c/{i}_ignore.png')
    locs.append(f'{iid},{paths[1]},')
    os.makedirs(tmp_path / 'maps' / 'test' / 'c', exist_ok=True)
    np.save(tmp_path / 'maps' / (iid + '.npy'), m)
    # Expected GT exactly as the reference's get_mask (nearest resize to 224, > 0.5).
    rs = lambda a: cv2.resize(np.float32(a), (224, 224), interpolation=cv2.INTER_NEAREST) > 0.5  # noqa: E731
    all_inst = rs(inst[0]) | rs(inst[1])
    ignore = rs(ign) & ~all_inst
    gt_masks.append(all_inst.astype(np.uint8) + 255 * ignore.astype(np.uint8))
  _write(str(meta / 'image_ids.txt'), ids)
  _write(str(meta / 'class_labels.txt'), [f'{i},0' for i in ids])
  _write(str(meta / 'localization.txt'), locs)
  out = tmp_path / 'o.json'
  rc = cli_main(
    [
      '--scoremap_root',
      str(tmp_path / 'maps'),
      '--metadata_root',
      str(tmp_path / 'meta'),
      '--dataset_name',
      'OpenImages',
      '--split',
      'test',
      '--mask_root',
      str(tmp_path / 'masks'),
      '--output_json',
      str(out),
      '--no_progress',
    ]
  )
  assert rc == 0
  got = json.loads(out.read_text())
  assert got['num_images'] == 10 and 'maxboxacc' not in got
  assert abs(got['pxap'] - ref_pxap(maps, gt_masks, 0.001)) <= 1e-9


def test_plots(tmp_path, realistic):
  from dualsig_jax.wsol.plots import plot_box_curves, plot_pr_curves

  maps, gts, correct = realistic
  res = {}
  for head in ('softmax', 'sigmoid'):
    ev = BoxEvaluator(cam_curve_interval=0.05, num_workers=0)
    ev.accumulate(np.stack(maps[:6]), gts[:6], correct[:6])
    res[head] = ev.compute()
  p = plot_box_curves(res, str(tmp_path / 'box.png'))
  assert os.path.getsize(p) > 1000
  assert os.path.getsize(plot_box_curves(res, str(tmp_path / 't.png'), curve='top1')) > 1000
  mev = MaskEvaluator(0.01)
  mev.accumulate(np.stack(maps[:4]), (np.stack(maps[:4]) > 0.5).astype(np.uint8))
  assert os.path.getsize(plot_pr_curves({'a': mev.compute()}, str(tmp_path / 'pr.png'))) > 1000
  with pytest.raises(ValueError, match='valid'):
    plot_box_curves(res, str(tmp_path / 'x.png'), curve='nope')
