"""TensorBoard event files of a run, read back with TensorBoard's own reader
(`EventAccumulator`): the curves of metrics.jsonl, the per-epoch CAM overlays of both heads, the
evaluation metrics; a resumed stage without duplicate steps; the option that turns it off."""

import io
import json
import os

import numpy as np
import pytest

pytest.importorskip('tensorboard')
from PIL import Image
from smoke_helpers import loss_steps, metrics, smoke_config
from smoke_helpers import smoke_data as smoke_data  # noqa: F401 (session fixture)
from tensorboard.backend.event_processing import event_accumulator

from dualsig_jax import experiment
from dualsig_jax.train import loop, summary


def read(logdir):
  acc = event_accumulator.EventAccumulator(
    logdir, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
  )
  acc.Reload()
  return acc


def steps(acc, tag):
  return [e.step for e in acc.Scalars(tag)]


def test_a_smoke_run_writes_curves_cam_overlays_and_eval_metrics(smoke_data, tmp_path):  # noqa: F811
  workdir = str(tmp_path / 'run')
  experiment.run(smoke_config(smoke_data), workdir)
  tb = os.path.join(workdir, summary.FOLDER)
  assert sorted(os.listdir(tb)) == ['dual', 'eval', 'vanilla']
  records = metrics(workdir)
  for stage, epoch_ends in (('vanilla', [8, 16]), ('dual', [8])):
    acc = read(os.path.join(tb, stage))
    logged = [r for r in records if r.get('stage') == stage and 'loss' in r]
    # Every number of every metrics.jsonl record is a curve, at the record's step, once.
    for key in ('loss', 'lr', 'lr_classifier', 'images_per_s'):
      assert steps(acc, key) == [r['step'] for r in logged], (stage, key)
      got = [e.value for e in acc.Scalars(key)]
      np.testing.assert_allclose(got, [r[key] for r in logged], rtol=1e-6)
    if stage == 'dual':
      assert 'bce' in acc.Tags()['scalars']
    # Both heads' CAM overlays at each epoch's end, as PNGs of the same size.
    for head in ('softmax', 'sigmoid'):
      shots = acc.Images(f'cams/{head}')
      assert [s.step for s in shots] == epoch_ends, (stage, head)
      pixels = np.asarray(Image.open(io.BytesIO(shots[-1].encoded_image_string)))
      assert pixels.shape == (shots[-1].height, shots[-1].width, 3)
      assert pixels.std() > 5  # a picture, not a blank canvas
    first = np.asarray(Image.open(io.BytesIO(acc.Images('cams/sigmoid')[0].encoded_image_string)))
    last = np.asarray(Image.open(io.BytesIO(acc.Images('cams/sigmoid')[-1].encoded_image_string)))
    if stage == 'vanilla':  # the backbone trains between the two epochs: the maps move
      assert first.shape == last.shape and np.abs(first.astype(int) - last).max() > 0
  acc = read(os.path.join(tb, 'eval'))
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  final = results['checkpoints']['dual']['step']
  for tag, value in (
    ('cam/sigmoid/top1_loc', results['methods']['cam']['sigmoid']['top1_loc']),
    ('gradcam/softmax/maxboxacc_v2', results['methods']['gradcam']['softmax']['maxboxacc_v2']),
    ('classification/softmax_top1', results['classification']['softmax_top1']),
  ):
    (point,) = acc.Scalars(tag)
    assert point.step == final
    assert point.value == pytest.approx(value, rel=1e-6)


def test_a_resumed_stage_continues_the_curves_without_duplicate_steps(smoke_data, tmp_path):  # noqa: F811
  """Steps 4 and 8 saved, step 8 lost (a damaged checkpoint): the run resumes from 4 and logs
  6 and 8 again; TensorBoard holds each step once, with the resumed run's values."""
  workdir = str(tmp_path)
  no_images = {'logging.tensorboard_images': 0}  # the curves are the point here
  c = smoke_config(smoke_data, **{'vanilla.max_steps': 8, 'checkpoint.every_steps': 4}, **no_images)
  loop.train_stage(c, workdir, 'vanilla')
  logdir = os.path.join(workdir, summary.FOLDER, 'vanilla')
  assert steps(read(logdir), 'loss') == [2, 4, 6, 8]
  step8 = os.path.join(workdir, 'vanilla', 'checkpoints', '8')
  with open(os.path.join(step8, 'state', '_METADATA'), 'r+b') as f:
    f.truncate(100)
  c = smoke_config(
    smoke_data, **{'vanilla.max_steps': 12, 'checkpoint.every_steps': 4}, **no_images
  )
  loop.train_stage(c, workdir, 'vanilla')
  assert loss_steps(workdir) == [2, 4, 6, 8, 10, 12]
  acc = read(logdir)
  assert steps(acc, 'loss') == [2, 4, 6, 8, 10, 12]
  final = [r for r in metrics(workdir) if r.get('stage') == 'vanilla' and 'loss' in r]
  np.testing.assert_allclose([e.value for e in acc.Scalars('loss')], [r['loss'] for r in final])
  # The raw files agree (no reader-side purge hides a duplicate): one event per step and tag.
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

  seen = []
  for name in sorted(os.listdir(logdir)):
    for e in EventFileLoader(os.path.join(logdir, name)).Load():
      seen += [(e.step, v.tag) for v in e.summary.value if v.tag == 'loss']
  assert sorted(seen) == [(s, 'loss') for s in (2, 4, 6, 8, 10, 12)]


def test_the_option_turns_it_off_and_only_process_0_writes(smoke_data, tmp_path, monkeypatch):  # noqa: F811
  c = smoke_config(smoke_data, **{'vanilla.max_steps': 1, 'logging.tensorboard': False})
  loop.train_stage(c, str(tmp_path), 'vanilla')
  assert os.path.exists(os.path.join(str(tmp_path), 'metrics.jsonl'))
  assert not os.path.exists(os.path.join(str(tmp_path), summary.FOLDER))
  on = smoke_config(smoke_data)
  assert summary.enabled(on)
  monkeypatch.setattr(summary.jax, 'process_index', lambda: 1)
  assert not summary.enabled(on)


def test_truncate_events_keeps_the_steps_up_to_the_resume_point(tmp_path):
  w = summary.Writer(str(tmp_path))
  for step in (1, 2, 3, 4):
    w.scalars(step, {'loss': float(step)})
  w.image(3, 'cams/sigmoid', np.zeros((4, 6, 3), np.float32))
  w.close()
  assert summary.truncate_events(str(tmp_path), 2) == 3
  acc = read(str(tmp_path))
  assert steps(acc, 'loss') == [1, 2]
  assert acc.Tags()['images'] == []
