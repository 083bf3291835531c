"""The evaluators' shared streaming protocol (state / merge / reset), on which the multi-host
combine is written once (dualsig_jax.combine; the 2-process run is tests/test_eval_distributed)."""

import numpy as np
import pytest

from dualsig_jax import combine, wsol
from dualsig_jax.cam.fidelity import FidelityAccumulator


def _batches(rng, n_batches=4, b=3, size=24):
  for _ in range(n_batches):
    maps = rng.random((b, size, size)).astype(np.float32)
    boxes = [np.array([[2, 3, 15, 18]]) for _ in range(b)]
    masks = (rng.random((b, size, size)) < 0.3).astype(np.uint8)
    masks[:, :2] = 255
    yield maps, boxes, rng.random(b) < 0.5, masks


@pytest.mark.parametrize('kind', ['box', 'mask'])
def test_split_then_merged_equals_whole(kind):
  make = {
    'box': lambda: wsol.BoxEvaluator(iou_threshold_list=(30, 50), cam_curve_interval=0.05),
    'mask': lambda: wsol.MaskEvaluator(cam_curve_interval=0.05),
  }[kind]
  whole, parts = make(), [make(), make()]
  for i, (maps, boxes, correct, masks) in enumerate(_batches(np.random.default_rng(0))):
    args = (maps, boxes, correct) if kind == 'box' else (maps, masks)
    whole.accumulate(*args)
    parts[i % 2].accumulate(*args)
  merged = make()
  merged.accumulate(*((maps, boxes, correct) if kind == 'box' else (maps, masks)))
  merged.reset()  # reset forgets that batch
  for p in parts:
    merged.merge(p.state())
  a, b = whole.compute(), merged.compute()
  assert a['num_images'] == b['num_images'] == 12
  np.testing.assert_equal(a, b)


def test_merge_refuses_another_evaluators_state():
  a = wsol.BoxEvaluator(iou_threshold_list=(30, 50), cam_curve_interval=0.05)
  b = wsol.BoxEvaluator(iou_threshold_list=(30, 50), cam_curve_interval=0.1)
  with pytest.raises(ValueError, match='counts'):
    a.merge(b.state())
  m = wsol.MaskEvaluator(cam_curve_interval=0.05)
  with pytest.raises(ValueError, match='gt_true_hist'):
    m.merge(wsol.MaskEvaluator(cam_curve_interval=0.1).state())


def test_counts_and_fidelity_follow_the_protocol_and_one_process_is_a_no_op():
  c = combine.Counts(('softmax', 'num_images'))
  c.add('softmax', 3)
  c.add('num_images', 5)
  f = FidelityAccumulator()
  f.accumulate({'drop': np.array([0.5, 0.25]), 'increase': np.array([1.0, 0.0])})
  before = (c.compute(), f.compute())
  combine.combine_over_processes({'top1': c, 'fid': f})  # one process: unchanged
  assert (c.compute(), f.compute()) == before
  assert combine.gather_states(c.state()) == [{'num_images': 5, 'softmax': 3}]
  got = combine.gather_states(f.state())[0]
  np.testing.assert_array_equal(got['drops'], np.float32([0.5, 0.25]))
  c.reset()
  assert c.compute() == {'softmax': 0, 'num_images': 0}
