"""TFDS source, with a fake ``tfds.data_source``: records, boxes in the wsolevaluation pixel
convention, the configured train/eval split names, and the warning when a dataset has no boxes."""

import logging
import types

import data_helpers
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dualsig_jax.data import check_labels, loaders
from dualsig_jax.data.metadata import MetadataError
from dualsig_jax.data.sources import tfds_boxes

# Fixtures shared with the other data tests (bound here so pytest finds them).
synth_dir, data = data_helpers.synth_dir, data_helpers.data


def _features(with_bbox=True, num_classes=5):
  feats = {
    'image': tfds.features.Image(),
    'label': tfds.features.ClassLabel(num_classes=num_classes),
  }
  if with_bbox:
    feats['bbox'] = tfds.features.BBoxFeature()
  return tfds.features.FeaturesDict(feats)


class _FakeTfds:
  """Stands in for tfds.data_source(...): records as the caltech_birds2011 builder yields
  (``bbox``), or detection-style ``objects/bbox``, or no boxes (imagenet2012)."""

  def __init__(self, n=12, boxes='mixed', num_classes=5):
    rng = np.random.default_rng(0)
    self.records = []
    for i in range(n):
      h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
      shape = [(h, w, 3), (h, w, 1), (h, w, 4)][i % 3]
      rec = {
        'image': rng.integers(0, 255, shape, dtype=np.uint8),
        'label': i % num_classes,
        'image/filename': f'{i}.jpg',
      }
      box = np.array([0.1, 0.2, 0.7, 0.9], np.float32)  # ymin, xmin, ymax, xmax
      if boxes == 'bbox' or (boxes == 'mixed' and i % 2):
        rec['bbox'] = box
      elif boxes == 'mixed':
        rec['objects'] = {'bbox': np.stack([box, box / 2])}
      self.records.append(rec)
    self.dataset_info = types.SimpleNamespace(
      features=_features(with_bbox=boxes != 'none', num_classes=num_classes)
    )

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


@pytest.fixture
def fake_tfds(monkeypatch):
  """Patches tfds.data_source; returns (set_fake, calls): set_fake(fake) picks the records."""
  state = {'fake': _FakeTfds()}
  calls = []

  def data_source(name, *, split, data_dir=None, download=True, **kw):
    calls.append((name, split, download))
    return state['fake']

  monkeypatch.setattr(tfds, 'data_source', data_source)
  return lambda fake: state.update(fake=fake), calls


def _tfds_cfg(cfg, **tfds_fields):
  cfg.source = 'tfds'
  cfg.tfds = dict(name='caltech_birds2011', data_dir='/nowhere', **tfds_fields)
  return cfg


def test_tfds_source_with_fake_records(data, fake_tfds):
  set_fake, calls = fake_tfds
  fake = _FakeTfds()
  set_fake(fake)
  _tfds_cfg(data)
  loader = loaders.make_eval_loader(data, 'test', batch_size=5)
  assert len(loader) == 3 and loader.metadata.image_ids[1] == 'caltech_birds2011/test/1'
  batches = list(loader)
  assert batches[-1]['valid'].tolist() == [True, True, False, False, False]
  for b in batches:
    for row in np.nonzero(b['valid'])[0]:
      rec = fake.records[b['index'][row]]
      h, w = rec['image'].shape[:2]
      boxes = rec['bbox'][None] if 'bbox' in rec else rec['objects']['bbox']
      px = [
        [round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)]
        for y0, x0, y1, x1 in boxes.astype(np.float64)
      ]
      want = [
        [int(a * 64 / w), int(b_ * 64 / h), int(c * 64 / w), int(d * 64 / h)] for a, b_, c, d in px
      ]
      assert b['boxes'][row, : b['num_boxes'][row]].tolist() == want
      assert b['label'][row] == rec['label']
  train = next(
    iter(
      loaders.make_train_loader(
        data, seed=0, num_epochs=1, process_index=0, process_count=1, batch_size=4
      )
    )
  )
  assert train['image'].shape == (4, 64, 64, 3)
  assert loaders.steps_per_epoch(data, 4) == 3
  assert ('caltech_birds2011', 'test', False) in calls
  assert ('caltech_birds2011', 'train', False) in calls


def test_tfds_split_names_from_config(data, fake_tfds):
  """input.tfds.train_split / eval_split name the TFDS splits of the train / eval loaders."""
  _, calls = fake_tfds
  _tfds_cfg(data, train_split='train[:80%]', eval_split='validation')
  loaders.make_eval_loader(data, data.eval_split, batch_size=4)
  assert calls[-1][:2] == ('caltech_birds2011', 'validation')
  loaders.make_train_loader(
    data, seed=0, num_epochs=1, process_index=0, process_count=1, batch_size=4
  )
  assert calls[-1][:2] == ('caltech_birds2011', 'train[:80%]')
  loaders.steps_per_epoch(data, 4)
  assert calls[-1][:2] == ('caltech_birds2011', 'train[:80%]')
  loaders.make_eval_loader(data, data.train_split, batch_size=4)  # Eval on the train split.
  assert calls[-1][:2] == ('caltech_birds2011', 'train[:80%]')
  assert {c[1] for c in calls} == {'validation', 'train[:80%]'}


def test_tfds_boxes_reach_the_metadata(data, fake_tfds):
  """With a bbox feature the eval split has localization metadata (evaluate runs MaxBoxAcc)."""
  set_fake, _ = fake_tfds
  fake = _FakeTfds(boxes='bbox')
  set_fake(fake)
  meta = loaders.make_eval_loader(_tfds_cfg(data), 'test', batch_size=4).metadata
  assert meta.boxes and len(meta.boxes) == len(fake)
  rec = fake.records[3]
  h, w = rec['image'].shape[:2]
  assert meta.boxes['caltech_birds2011/test/3'].tolist() == tfds_boxes(rec, w, h).tolist()


def test_tfds_without_boxes_warns_which_metrics_are_skipped(data, fake_tfds, caplog):
  set_fake, _ = fake_tfds
  set_fake(_FakeTfds(boxes='none'))
  _tfds_cfg(data)
  data.tfds['name'] = 'imagenet2012'
  with caplog.at_level(logging.WARNING, logger='dualsig_jax.data'):
    meta = loaders.make_eval_loader(data, 'test', batch_size=4).metadata
  assert not meta.boxes
  warnings = [
    r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith('dualsig_jax')
  ]
  assert len(warnings) == 1
  msg = warnings[0].getMessage()
  assert 'imagenet2012' in msg and 'bbox' in msg and 'MaxBoxAcc' in msg


def test_tfds_boxes_follow_the_wsolevaluation_convention():
  """caltech_birds2011 stores (y, x, y + h, x + w) / image size as float32; the pixel box must be
  the (x0, y0, x1, y1) = (x, y, x + w, y + h) line of the shipped CUB localization.txt."""
  w_img, h_img = 500, 335  # 001.../Black_Footed_Albatross_0046_18.jpg, box 60,27,385,331
  x, y, bw, bh = 60.0, 27.0, 325.0, 304.0  # CUB bounding_boxes.txt: x, y, width, height
  bbox = np.array([y / h_img, x / w_img, (y + bh) / h_img, (x + bw) / w_img], np.float32)
  assert tfds_boxes({'bbox': bbox}, w_img, h_img).tolist() == [[60, 27, 385, 331]]


def test_tfds_label_count_checked_against_the_model(data, fake_tfds):
  set_fake, _ = fake_tfds
  set_fake(_FakeTfds(num_classes=5))
  meta = loaders.make_eval_loader(_tfds_cfg(data), 'test', batch_size=4).metadata
  check_labels(meta, 5)
  with pytest.raises(MetadataError, match='caltech_birds2011.*5 classes'):
    check_labels(meta, 4)


def test_tfds_needs_name(data):
  data.source = 'tfds'
  with pytest.raises(ValueError, match='tfds.name'):
    loaders.make_eval_loader(data, 'test', batch_size=4)
