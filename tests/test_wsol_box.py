"""WSOL box metrics: exactness of both paths (compiled kernel, traced OpenCV) against a literal
per-threshold port of wsolevaluation (bench/wsol_reference.py)."""

import os
import warnings

import cv2
import numpy as np
import pytest
from wsol_reference import (
  RefBoxEvaluator,
  _norm,
  assert_same,
  gt_boxes_near,
  hand_maps,
  realistic_map,
  realistic_set,
  ref_boxes_at_thresholds,
  ref_image_ious,
)

from dualsig_jax.wsol import BoxEvaluator, image_box_ious, native
from dualsig_jax.wsol import levels as levels_mod
from dualsig_jax.wsol.levels import _SPECKLE_AREA, despeckle, quantize

PATHS = [True, False]  # image_box_ious(native=...): the kernel, the traced path
PATH_IDS = ['kernel', 'traced']


@pytest.fixture(autouse=True, scope='module')
def _kernel_builds():
  """The kernel must build here (CI has a C compiler) unless explicitly disabled."""
  if os.environ.get('DUALSIG_JAX_NATIVE', '1') == '0':
    pytest.skip('DUALSIG_JAX_NATIVE=0: kernel disabled')
  assert native.load() is not None, 'the WSOL box kernel did not build (see warnings)'


def _assert_ious_equal(m, gt, thr, use_native, msg=''):
  got, want = image_box_ious(m, gt, thr, native=use_native), ref_image_ious(m, gt, thr)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=f'{msg} {k}')
  return want


# --------------------------------------------------------------------------------------------
# Hand-made maps.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize('use_native', PATHS, ids=PATH_IDS)
@pytest.mark.parametrize('name', ['unimodal', 'blobs', 'ring', 'lines', 'zeros'])
def test_hand_made_maps_match_opencv(name, use_native):
  gt = np.array([[10, 10, 40, 50], [40, 40, 60, 60]])
  _assert_ious_equal(hand_maps()[name], gt, np.arange(0, 1, 0.001), use_native, name)


@pytest.mark.parametrize('use_native', PATHS, ids=PATH_IDS)
def test_hand_made_boxes_are_what_we_expect(use_native):
  """Boxes we can reason about, read off the OpenCV expectations."""
  maps = hand_maps()
  thr = [0.5]
  # Ring at 0.5: one outer contour and one hole; both boxes present in the multi set.
  multi, largest = ref_boxes_at_thresholds(maps['ring'], thr)
  assert len(multi[0]) == 2
  outer, hole = sorted(multi[0].tolist(), key=lambda b: b[0])
  assert outer[0] < hole[0] and hole[2] < outer[2]
  np.testing.assert_array_equal(largest[0][0], outer)
  # Multi-contour picks the hole's box when it matches the GT better than the outer box.
  gt_hole = np.array([hole])
  r = image_box_ious(maps['ring'], gt_hole, np.array([0.5]), native=use_native)
  assert r['multi'][0] == 1.0 and r['largest'][0] < 1.0
  # All-zero map: every threshold gives the box (0, 0, 0, 0).
  r = image_box_ious(maps['zeros'], np.array([[0, 0, 0, 0]]), np.arange(0, 1, 0.1), use_native)
  np.testing.assert_array_equal(r['multi'], 1.0)
  # A horizontal 1-pixel line: box is (x0, y, x1 + 1, y + 1) (boundingRect w/h, not clipped).
  m = np.zeros((20, 30), np.float32)
  m[5, 3:11] = 1.0
  r = image_box_ious(m, np.array([[3, 5, 11, 6]]), np.array([0.5]), native=use_native)
  assert r['largest'][0] == 1.0
  # Clipping to (W-1, H-1) when the object touches the right/bottom border.
  m = np.zeros((20, 30), np.float32)
  m[10:, 20:] = 1.0
  r = image_box_ious(m, np.array([[20, 10, 29, 19]]), np.array([0.5]), native=use_native)
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


@pytest.mark.parametrize('use_native', PATHS, ids=PATH_IDS)
def test_speckle_shortcut_edge_cases(use_native):
  """Best box from a tiny component or hole, levels of speckles only, area ties."""
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
    want = _assert_ious_equal(m, np.array(gt), thr, use_native, str(gt))
    assert want['multi'].max() == 1.0  # the speckle's own box is found
  # Only speckles, and equal-area twins (ties of the largest contour).
  rng = np.random.default_rng(3)
  sp = np.zeros((30, 30), np.float32)
  sp[rng.integers(0, 30, 40), rng.integers(0, 30, 40)] = rng.random(40).astype(np.float32)
  tw = np.zeros((30, 30), np.float32)
  tw[3:8, 3:8] = 0.5
  tw[15:20, 20:25] = 0.5
  tw[25, 2] = 1.0
  for mm in (sp, tw):
    _assert_ious_equal(mm, np.array([[2, 2, 9, 9], [20, 15, 26, 21]]), thr, use_native)


@pytest.mark.parametrize('noisy', [0, 10**9])
def test_box_parity_speckle_maps_tiny_gt(noisy, monkeypatch):
  """Noisy maps (most contours removed as speckle by the traced path), GT boxes small enough
  for speckles to win; traced path with and without the 3-pixel speckle sets, and the kernel."""
  monkeypatch.setattr(levels_mod, '_NOISY', noisy)
  rng = np.random.default_rng(99)
  thr = np.arange(0, 1, 0.001)
  for i in range(8):
    m = realistic_map(rng, size=96, kind=(3, 6)[i % 2])
    gt = gt_boxes_near(rng, m)
    y, x = rng.integers(1, 90, 2)
    gt = np.concatenate([gt, [[x, y, x + rng.integers(0, 3), y + rng.integers(0, 3)]]])
    want = _assert_ious_equal(m, gt, thr, False, str(i))
    if noisy == 0:
      got = image_box_ious(m, gt, thr, native=True)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f'kernel {i} {k}')


def _kernel_ties(m, gt, thr):
  """How many levels the kernel flags as ties of the largest area."""
  q = quantize(m)
  levels, _ = levels_mod.distinct_levels(q, levels_mod.threshold_cutoffs(int(q.max()), thr))
  lut = np.searchsorted(levels, np.arange(256), side='left').astype(np.int16)
  return int(((native.level_ious(q, lut, len(levels), gt)[3] & 1) != 0).sum())


# --------------------------------------------------------------------------------------------
# The kernel's facts (holes, islands, filled areas, ties) on maps where they all matter.
# --------------------------------------------------------------------------------------------
def test_kernel_random_small_maps_match_opencv():
  """Random small maps (up to 256 values, 1-pixel wide or tall ones too), tiny GT boxes so
  that every hole's and island's box can be the best one; per-threshold IoUs identical."""
  rng = np.random.default_rng(2024)
  thr = np.arange(0, 1, 0.005)
  ties = 0
  for i in range(120):
    h, w = (int(s) for s in rng.integers(1, 18, 2))
    values = int(rng.choice([2, 3, 5, 256]))
    m = rng.integers(0, values, (h, w)).astype(np.float64) / (values - 1)
    gts = []
    for _ in range(int(rng.integers(1, 4))):
      x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
      gts.append(
        [x, y, min(w - 1, x + int(rng.integers(0, 4))), min(h - 1, y + int(rng.integers(0, 4)))]
      )
    _assert_ious_equal(m, np.array(gts), thr, True, f'map {i} {h}x{w}')
    ties += _kernel_ties(m, np.array(gts), thr)
  assert ties > 20  # levels with equal largest areas, resolved in OpenCV's order, were seen


def test_kernel_nested_rings_islands_and_ties():
  """Rings in rings (holes holding islands holding holes), 1-pixel rings (outer and hole
  contours of equal area), a checkerboard (diagonal connectivity), twin squares (ties)."""
  m = np.zeros((41, 43), np.float32)
  m[2:39, 2:41] = 0.3
  m[5:36, 5:38] = 0.0  # hole of the outer frame
  m[8:33, 8:35] = 0.6  # island in it
  m[11:30, 11:32] = 0.1  # hole of the island
  m[14:27, 14:29] = 0.9  # island in that hole
  m[18, 18:25], m[23, 18:25], m[18:24, 18], m[18:24, 24] = 0.2, 0.2, 0.2, 0.2  # thin ring
  thin = np.zeros((12, 12), np.float32)
  thin[2, 2:9], thin[8, 2:9], thin[2:9, 2], thin[2:9, 8] = 1.0, 1.0, 1.0, 1.0
  checker = (np.indices((9, 11)).sum(axis=0) % 2).astype(np.float32)
  checker[4, 5] = 0.5
  twins = np.zeros((20, 30), np.float32)
  twins[2:8, 2:8], twins[10:16, 20:26] = 0.7, 0.7
  thr = np.arange(0, 1, 0.001)
  for mm, gts in [
    (m, [[17, 17, 25, 24], [4, 4, 38, 36], [10, 10, 32, 30]]),
    (thin, [[3, 3, 8, 8]]),
    (checker, [[4, 3, 6, 5], [0, 0, 10, 8]]),
    (twins, [[20, 10, 26, 16], [2, 2, 8, 8]]),
  ]:
    for g in gts:  # one GT at a time: each box has to be found on its own
      want = _assert_ious_equal(mm, np.array([g]), thr, True, str(g))
      assert want['multi'].max() > 0.5


def test_kernel_unavailable_falls_back(tmp_path, monkeypatch):
  """No compiler: a warning, then the traced path with the same results; native=True raises."""
  m = hand_maps()['ring']
  gt = np.array([[10, 10, 40, 50]])
  thr = np.arange(0, 1, 0.01)
  want = image_box_ious(m, gt, thr, native=True)
  monkeypatch.setattr(native, '_KERNEL', None)
  monkeypatch.setenv('DUALSIG_JAX_CACHE', str(tmp_path))
  monkeypatch.setenv('CC', str(tmp_path / 'no-such-compiler'))
  with pytest.warns(RuntimeWarning, match='kernel unavailable'):
    got = image_box_ious(m, gt, thr)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  with pytest.raises(RuntimeError, match='unavailable'):
    image_box_ious(m, gt, thr, native=True)
  # Disabled on purpose: no warning, traced path.
  monkeypatch.setattr(native, '_KERNEL', None)
  monkeypatch.setenv('DUALSIG_JAX_NATIVE', '0')
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert native.load() is None


# --------------------------------------------------------------------------------------------
# Parity on realistic maps.
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def realistic_ref():
  """Reference per-threshold IoUs at interval 0.01, computed once for the parity tests."""
  maps, gts, _ = realistic_set()
  thr = list(np.arange(0, 1, 0.01))
  return [ref_image_ious(m, g, thr) for m, g in zip(maps, gts)]


@pytest.mark.parametrize('use_native', PATHS, ids=PATH_IDS)
@pytest.mark.parametrize('multi', [True, False])
def test_box_parity_realistic(realistic_ref, multi, use_native, monkeypatch):
  if not use_native:
    monkeypatch.setattr(native, '_KERNEL', False)  # the evaluator's maps take the traced path
  maps, gts, correct = realistic_set()
  interval = 0.01
  ev = BoxEvaluator((30, 50, 70), interval, multi, 0.2, num_workers=0)
  ref = RefBoxEvaluator((30, 50, 70), interval, multi)
  for i in range(0, len(maps), 16):
    ev.accumulate(np.stack(maps[i : i + 16]), gts[i : i + 16], correct[i : i + 16])
  for r, c in zip(realistic_ref, correct):
    ref.accumulate(r, c)
  assert_same(ev.compute(), ref.compute())


@pytest.fixture(scope='module')
def fine_ref():
  """Reference per-threshold IoUs at interval 0.001 on every 12th realistic map."""
  maps, gts, correct = realistic_set()
  thr = np.arange(0, 1, 0.001)
  sel = list(zip(maps, gts, correct))[::12]
  return sel, [ref_image_ious(m, g, thr) for m, g, _ in sel]


@pytest.mark.parametrize('use_native', PATHS, ids=PATH_IDS)
def test_box_parity_fine_interval_and_per_image(fine_ref, use_native, monkeypatch):
  """interval 0.001 (every cutoff 0..254) on every 12th map; per-threshold IoUs identical."""
  if not use_native:
    monkeypatch.setattr(native, '_KERNEL', False)
  thr = np.arange(0, 1, 0.001)
  ev = BoxEvaluator((30, 50, 70), 0.001, True, 0.2, num_workers=0)
  ref = RefBoxEvaluator((30, 50, 70), 0.001, True)
  for (m, g, c), want in zip(*fine_ref):
    got = image_box_ious(m, g, thr, native=use_native)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    ev.accumulate(m[None], [g], [c])
    ref.accumulate(want, c)
  assert_same(ev.compute(), ref.compute())


@pytest.mark.parametrize('use_native', PATHS, ids=PATH_IDS)
def test_box_parity_float64_and_odd_sizes(use_native):
  rng = np.random.default_rng(7)
  for shape in [(37, 53), (5, 5), (1, 9), (224, 224)]:
    m = cv2.resize(rng.random((4, 4)), shape[::-1], interpolation=cv2.INTER_CUBIC)
    m = _norm(m).astype(np.float64)
    gt = np.array([[0, 0, shape[1] // 2, shape[0] // 2]])
    _assert_ious_equal(m, gt, np.arange(0, 1, 0.01), use_native, str(shape))


def test_process_pool_matches_inline():
  maps, gts, correct = realistic_set()
  a = BoxEvaluator(cam_curve_interval=0.01, num_workers=0)
  b = BoxEvaluator(cam_curve_interval=0.01, num_workers=2)
  batch = np.stack(maps[:12])
  a.accumulate(batch, gts[:12], correct[:12])
  b.accumulate(batch, gts[:12], correct[:12])
  assert a.compute() == b.compute()


def test_bad_inputs_raise():
  ev = BoxEvaluator(num_workers=0)
  ok = np.zeros((1, 8, 8), np.float32)
  with pytest.raises(ValueError, match='NaN'):
    ev.accumulate(np.full((1, 8, 8), np.nan, np.float32), [np.array([[0, 0, 1, 1]])])
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    ev.accumulate(ok + 2, [np.array([[0, 0, 1, 1]])])
  with pytest.raises(ValueError, match='B, H, W'):
    ev.accumulate(ok[0], [np.array([[0, 0, 1, 1]])])
  with pytest.raises(ValueError, match='empty'):
    ev.accumulate(np.zeros((1, 0, 8), np.float32), [np.array([[0, 0, 1, 1]])])
  with pytest.raises(ValueError, match='convention'):
    ev.accumulate(ok, [np.array([[5, 0, 1, 1]])])
  with pytest.raises(ValueError, match='iou_threshold_list'):
    BoxEvaluator(iou_threshold_list=(0,))
