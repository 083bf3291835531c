"""bench/seed_spread.py's statistics: the prediction interval and the table cells."""

import numpy as np
import pytest
import seed_spread  # bench/ is on sys.path (conftest)
from scipy import stats


def test_prediction_interval_is_the_student_t_formula():
  v = np.array([70.0, 72.0, 75.0, 73.0])
  lo, hi = seed_spread.prediction_interval(v)
  half = stats.t.ppf(0.95, 3) * np.std(v, ddof=1) * np.sqrt(1 + 1 / 4)
  assert (lo, hi) == pytest.approx((v.mean() - half, v.mean() + half))
  # Wider than the min-max of the runs it came from, centred on their mean.
  assert lo < v.min() and hi > v.max() and (lo + hi) / 2 == pytest.approx(v.mean())


def test_cells_mark_deltas_spanning_zero_and_print_no_interval_for_one_run():
  assert seed_spread._cell(np.array([1.0, 3.0]), delta=True).endswith(']')
  assert seed_spread._cell(np.array([-1.0, 3.0]), delta=True).endswith('≈ 0')
  one = seed_spread._cell(np.array([74.5]), delta=False)
  assert one == '74.50 (74.50 – 74.50)' and 'nan' not in one
  assert seed_spread._cell(np.array([-0.5]), delta=True) == '-0.50 (-0.50 – -0.50)'
