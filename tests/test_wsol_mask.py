"""WSOL PxAP (MaskEvaluator) against a literal port of wsolevaluation's MaskEvaluator."""

import numpy as np
import pytest
from wsol_reference import realistic_set, ref_pxap

from dualsig_jax.wsol import MaskEvaluator


def test_mask_parity_realistic():
  maps, _, _ = realistic_set()
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


def test_bad_mask_inputs_raise():
  ok = np.zeros((1, 8, 8), np.float32)
  with pytest.raises(ValueError, match='0, 1, 255'):
    MaskEvaluator(0.01).accumulate(ok, np.full((1, 8, 8), 7, np.uint8))
  with pytest.raises(ValueError, match='shape'):
    MaskEvaluator(0.01).accumulate(ok, np.zeros((1, 8, 7), np.uint8))


@pytest.mark.parametrize('interval', [0.001, 0.01, 0.03, 0.007, 0.333])
def test_bins_match_numpy_histogram(interval):
  """The direct bin computation counts as np.histogram over the reference's edges, also for
  scores exactly on an edge or one float64 step either side of it."""
  ev = MaskEvaluator(interval)
  t = ev.thresholds
  x = np.concatenate(
    [
      np.random.default_rng(0).random(20000),
      t,
      np.nextafter(t, -1.0),
      np.nextafter(t, 2.0),
      np.random.default_rng(1).random(5000).astype(np.float32).astype(np.float64),
      [0.0, 1.0, np.nextafter(1.0, 0.0)],
    ]
  )
  x = x[(x >= 0) & (x <= 1)]
  got = np.bincount(ev._bins(x), minlength=ev.num_bins)
  np.testing.assert_array_equal(got, np.histogram(x, bins=ev.edges)[0])
