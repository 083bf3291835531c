"""WSOL box metrics: exactness of both paths (the kernel built at install, the exact per-level
OpenCV fallback) against a literal per-threshold port of wsolevaluation
(bench/wsol_reference.py); the kernel's loading, its fallbacks and the worker pools."""

import os
import subprocess
import sys
import textwrap
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
from dualsig_jax.wsol.levels import quantize

PATHS = [True, False]  # image_box_ious(native=...): the kernel, the exact OpenCV fallback
PATH_IDS = ['kernel', 'fallback']
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope='module')
def _kernel_built():
  """The kernel must have been built by the install (CI has a C compiler) unless disabled."""
  if os.environ.get('DUALSIG_JAX_NATIVE', '1') == '0':
    pytest.skip('DUALSIG_JAX_NATIVE=0: kernel disabled')
  assert native.load() is not None, f'the WSOL box kernel is unavailable: {native.status()}'


def _run_script(code, env=None, cwd=None):
  """Runs ``code`` as a plain script (no __main__ guard) in a fresh interpreter."""
  return subprocess.run(
    [sys.executable, '-c', textwrap.dedent(code)],
    capture_output=True,
    text=True,
    timeout=120,
    env=env,
    cwd=cwd or REPO,
  )


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


def test_box_parity_speckle_maps_tiny_gt():
  """Noisy maps (thousands of tiny components and holes), GT boxes small enough for a speckle's
  box to win; per-threshold IoUs of the kernel identical to the reference's."""
  rng = np.random.default_rng(99)
  thr = np.arange(0, 1, 0.001)
  for i in range(8):
    m = realistic_map(rng, size=96, kind=(3, 6)[i % 2])
    gt = gt_boxes_near(rng, m)
    y, x = rng.integers(1, 90, 2)
    gt = np.concatenate([gt, [[x, y, x + rng.integers(0, 3), y + rng.integers(0, 3)]]])
    _assert_ious_equal(m, gt, thr, True, str(i))


def _kernel_ties(m, gt, thr):
  """How many levels the kernel flags as ties of the largest area."""
  q = quantize(m)
  levels, _ = levels_mod.distinct_levels(q, levels_mod.threshold_cutoffs(int(q.max()), thr))
  return int(
    ((native.level_ious(q, levels_mod.level_lut(levels), len(levels), gt)[3] & 1) != 0).sum()
  )


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


def test_kernel_unavailable_falls_back(monkeypatch):
  """Not built: one warning naming the cost, then the exact fallback with the same results;
  native=True raises; DUALSIG_JAX_NATIVE=0 disables it without a warning."""
  m = hand_maps()['ring']
  gt = np.array([[10, 10, 40, 50]])
  thr = np.arange(0, 1, 0.01)
  want = image_box_ious(m, gt, thr, native=True)
  monkeypatch.setattr(native, '_STATE', None)
  monkeypatch.setattr(native, 'library_path', lambda: None)
  with pytest.warns(RuntimeWarning, match='not built at install time.*slower'):
    got = image_box_ious(m, gt, thr)
  assert native.status().startswith('fallback: ')
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  with pytest.raises(RuntimeError, match='unavailable'):
    image_box_ious(m, gt, thr, native=True)
  monkeypatch.setattr(native, '_STATE', None)
  monkeypatch.setenv('DUALSIG_JAX_NATIVE', '0')
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert native.load() is None
  assert native.status() == 'fallback: DUALSIG_JAX_NATIVE=0'


def test_broken_library_falls_back_without_crashing(tmp_path):
  """A truncated (dlopen would die of SIGBUS) or garbage library, or one that fails the
  self-check: a warning and the fallback, in a process that goes on and exits 0."""
  lib = native.library_path()
  data = open(lib, 'rb').read()
  bad = {
    'garbage': os.urandom(5000),
    'empty': b'',
    'header_only': data[:40],
    **{f'cut_{n}': data[:n] for n in (100, 4000, len(data) // 2, len(data) - 1)},
  }
  for name, content in bad.items():
    (tmp_path / f'{name}.so').write_bytes(content)
  # Libraries without a build digest are checked in a child: its verdicts go to tmp_path.
  env = {**os.environ, 'XDG_CACHE_HOME': str(tmp_path / 'cache')}
  proc = _run_script(
    f"""
    import warnings
    import numpy as np
    from dualsig_jax.wsol import image_box_ious, native
    m = np.zeros((20, 20), np.float32); m[5:15, 5:15] = 1.0; m[8:12, 8:12] = 0.3
    want = image_box_ious(m, [[5, 5, 15, 15]], np.arange(0, 1, 0.05), native=True)
    real_path = native.library_path
    for name in {sorted(bad)!r} + ['self_check']:
      native._STATE = None
      if name == 'self_check':  # the real library, found wrong by its check
        native.library_path, native._self_check = real_path, lambda fn: False
      else:
        native.library_path = lambda: {str(tmp_path)!r} + '/' + name + '.so'
      with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        got = image_box_ious(m, [[5, 5, 15, 15]], np.arange(0, 1, 0.05))
      assert all(np.array_equal(got[k], want[k]) for k in want)
      assert len(w) == 1 and 'slower' in str(w[0].message), [str(x.message) for x in w]
      print(name, native.status())
    """,
    env=env,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == len(bad) + 1 and all(' fallback: ' in x for x in lines), lines
  assert 'self-check' in lines[-1]


def test_import_reports_the_native_path_and_compiles_nothing(tmp_path):
  """``import dualsig_jax.wsol`` loads the library built at install: with no compiler reachable
  (PATH and CC point nowhere) and an empty HOME, the native path is in use and nothing is
  written under HOME (no cache); the package does not import its CLI."""
  lib = native.library_path()
  # Without the digest setup.py records, the library is checked in a child and the verdict
  # cached under HOME: an install from before the record needs pip install -e . again.
  assert os.path.isfile(lib + native.DIGEST_SUFFIX), f'no {lib}.sha256: run pip install -e .'
  home = tmp_path / 'home'
  home.mkdir()
  env = {**os.environ, 'HOME': str(home), 'PATH': str(tmp_path / 'nowhere'), 'CC': 'false'}
  env.pop('XDG_CACHE_HOME', None)
  env.pop('DUALSIG_JAX_NATIVE', None)
  proc = _run_script(
    """
    import sys
    import numpy as np
    import dualsig_jax.wsol as wsol
    print(wsol.KERNEL)
    assert 'dualsig_jax.wsol.cli' not in sys.modules
    r = wsol.image_box_ious(np.eye(9, dtype=np.float32), [[0, 0, 8, 8]], [0.5], native=True)
    print(r['multi'][0])
    """,
    env=env,
    cwd=str(tmp_path),
  )
  assert proc.returncode == 0, proc.stderr
  kernel, iou = proc.stdout.splitlines()
  assert kernel == f'native: {native.library_path()}'
  assert float(iou) > 0
  assert not list(home.rglob('*'))


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
    monkeypatch.setattr(native, '_STATE', (None, 'fallback: test'))  # the evaluator's maps too
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
    monkeypatch.setattr(native, '_STATE', (None, 'fallback: test'))
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


@pytest.mark.parametrize('pool', ['thread', 'process'])
def test_pools_match_inline(pool):
  maps, gts, correct = realistic_set()
  a = BoxEvaluator(cam_curve_interval=0.01, num_workers=0)
  b = BoxEvaluator(cam_curve_interval=0.01, num_workers=2, pool=pool)
  batch = np.stack(maps[:12])
  a.accumulate(batch, gts[:12], correct[:12])
  b.accumulate(batch, gts[:12], correct[:12])
  assert a.compute() == b.compute()


def test_default_evaluator_runs_in_a_plain_script(tmp_path):
  """The default pool (threads) needs no ``if __name__ == '__main__'`` guard: a script written
  as the README's example, run as a file, evaluates in parallel and exits cleanly."""
  script = tmp_path / 'plain.py'
  script.write_text(
    textwrap.dedent(
      """
      import numpy as np
      from dualsig_jax import wsol

      rng = np.random.default_rng(0)
      maps = rng.random((8, 32, 32)).astype(np.float32)
      boxes = [np.array([[4, 4, 20, 20]])] * 8
      ev = wsol.BoxEvaluator(cam_curve_interval=0.01, num_workers=2)
      ev.accumulate(maps, boxes, np.ones(8, bool))
      one = wsol.BoxEvaluator(cam_curve_interval=0.01, num_workers=0)
      one.accumulate(maps, boxes, np.ones(8, bool))
      assert ev.compute() == one.compute()
      print('ok', ev.pool, ev.compute()['maxboxacc_v2'])
      """
    )
  )
  proc = subprocess.run(
    [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=str(tmp_path)
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith('ok thread ')


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
  with pytest.raises(ValueError, match=r"\['thread', 'process'\]"):
    BoxEvaluator(pool='threads')
  for bad in (0.0, -0.1, 1.5, float('nan')):
    with pytest.raises(ValueError, match='cam_curve_interval'):
      BoxEvaluator(cam_curve_interval=bad)
  assert BoxEvaluator(cam_curve_interval=1.0).thresholds.tolist() == [0.0]


def test_config_and_evaluators_accept_the_same_intervals():
  """eval.cam_curve_interval: the config schema and the evaluators share one declared range."""
  import importlib

  from dualsig_jax import defaults
  from dualsig_jax.wsol import MaskEvaluator

  sys.path.insert(0, REPO)  # configs/ is a folder of the repository, not of the package
  c = importlib.import_module('configs.synthetic').get_config()
  c.unlock()
  for value in (0.0, -0.01, 1.01, float('nan'), 0.001, 0.5, 1.0):
    c.eval.cam_curve_interval = value
    try:
      defaults.validate(c)
      config_ok = True
    except ValueError:
      config_ok = False
    for cls in (BoxEvaluator, MaskEvaluator):
      try:
        cls(cam_curve_interval=value)
        ok = True
      except ValueError:
        ok = False
      assert ok == config_ok == (0 < value <= 1), (cls, value)


def test_kernel_releases_the_gil():
  """While one thread runs the kernel on a large map, Python code runs in another: the reason
  the default pool is threads. Holding the GIL, the loop below would get one switch interval
  (5 ms, ~5e4 spins); released, it runs for the whole call (~1e6 spins on a fast core; 4.7e5
  seen on a slow shared one, hence the threshold at 4x the held case)."""
  import threading

  rng = np.random.default_rng(5)
  q = quantize(cv2.resize(rng.random((200, 200)), (1000, 1000)).astype(np.float32))
  levels = np.unique(q).astype(np.int64)[:-1]
  n, lut, gt = len(levels), levels_mod.level_lut(levels), np.array([[0, 0, 9, 9]], np.int64)
  out = [np.empty(n) for _ in range(3)] + [np.empty(n, np.int8)]
  p = [a.ctypes.data for a in (q, lut, gt, *out)]
  # The bound function itself, pointers ready: no Python work left in the thread.
  args = (p[0], q.shape[0], q.shape[1], p[1], n, p[2], 1, *p[3:])
  worker = threading.Thread(target=native.load(), args=args)
  spins = 0
  worker.start()
  while worker.is_alive():
    spins += 1
  worker.join()
  assert spins > 200_000, spins
