"""SYNTH benchmark: layout, determinism, consistency of boxes/masks, ensure_synthetic."""

import filecmp
import os

import cv2
import numpy as np
import pytest
from ml_collections import ConfigDict

from dualsig_jax.data import synthetic
from dualsig_jax.data.metadata import load_metadata

SMALL = dict(num_classes=10, image_size=48, num_train=30, num_val=10, num_test=20, seed=7)


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('syn'))
  synthetic.generate(out, **SMALL, workers=1)
  return out


def test_layout_and_metadata(small):
  root = os.path.join(small, 'metadata')
  for split, n in [('train', 30), ('val', 10), ('test', 20)]:
    m = load_metadata(root, 'SYNTH', split, num_classes=10)
    assert len(m) == n and all(i.startswith(f'images/{split}/') for i in m.image_ids)
    assert all(os.path.isfile(os.path.join(small, i)) for i in m.image_ids)
    assert bool(m.masks) == (split != 'train')
    for i in m.image_ids:
      w, h = m.sizes[i]
      img = cv2.imread(os.path.join(small, i))
      assert img.shape == (h, w, 3)
      ((x0, y0, x1, y1),) = m.boxes[i].tolist()
      assert 0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h
      side = max(x1 - x0, y1 - y0) + 1
      assert 0.1 * min(w, h) <= side <= 0.7 * min(w, h)
      if m.masks:
        (mask_path,), ignore_path = m.masks[i]
        mask = cv2.imread(os.path.join(small, mask_path), cv2.IMREAD_GRAYSCALE)
        ys, xs = np.nonzero(mask > 127)
        assert [xs.min(), ys.min(), xs.max(), ys.max()] == [x0, y0, x1, y1]
        ignore = cv2.imread(os.path.join(small, ignore_path), cv2.IMREAD_GRAYSCALE)
        assert ignore.any() and set(np.unique(ignore)) <= {0, 255}
  labels = load_metadata(root, 'SYNTH', 'train').labels.values()
  assert sorted(labels) == sorted(list(range(10)) * 3)  # Balanced.


def test_deterministic_for_any_worker_count(small, tmp_path):
  other = str(tmp_path / 'b')
  synthetic.generate(other, **SMALL, workers=2)  # Pool path (> 64 images).
  for rel in [
    'images/train/00003.jpg',
    'masks/test/00004.png',
    'images/test/00019.jpg',
    'metadata/SYNTH/test/localization.txt',
    'metadata/SYNTH/val/image_sizes.txt',
  ]:
    assert filecmp.cmp(os.path.join(small, rel), os.path.join(other, rel), shallow=False), rel
  third = str(tmp_path / 'c')
  synthetic.generate(third, **{**SMALL, 'seed': 8}, workers=1)
  assert not filecmp.cmp(
    os.path.join(small, 'images/test/00000.jpg'),
    os.path.join(third, 'images/test/00000.jpg'),
    shallow=False,
  )


def test_bad_params():
  with pytest.raises(ValueError, match='num_classes'):
    synthetic.generate('/tmp/unused', num_classes=11)
  with pytest.raises(ValueError, match='image_size'):
    synthetic.generate('/tmp/unused', image_size=8)


def test_ensure_synthetic_idempotent_and_redoes_interrupted(tmp_path):
  cfg = ConfigDict(
    dict(
      data_root=str(tmp_path / 'd'),
      metadata_root='',
      synthetic=dict(SMALL, num_train=20, num_val=0, num_test=10),
    )
  )
  synthetic.ensure_synthetic(cfg)
  marker = tmp_path / 'd' / '.complete'
  img = tmp_path / 'd' / 'images/train/00000.jpg'
  stamp = img.stat().st_mtime_ns
  synthetic.ensure_synthetic(cfg)  # Complete: nothing rewritten.
  assert img.stat().st_mtime_ns == stamp
  marker.unlink()  # As if interrupted before the marker: regenerate from scratch.
  os.remove(tmp_path / 'd' / 'images/test/00003.jpg')
  synthetic.ensure_synthetic(cfg)
  assert marker.exists() and (tmp_path / 'd' / 'images/test/00003.jpg').exists()
  cfg.synthetic.num_test = 12  # Other parameters: regenerate.
  cfg.metadata_root = str(tmp_path / 'meta')
  synthetic.ensure_synthetic(cfg)
  assert len(load_metadata(cfg.metadata_root, 'SYNTH', 'test')) == 12


def test_cli_tiny_preset(tmp_path, capsys):
  synthetic.main(
    ['--out', str(tmp_path), '--preset', 'tiny', '--num_train', '20', '--workers', '1']
  )
  assert 'wrote 140 images' in capsys.readouterr().out
  assert (tmp_path / '.complete').exists()
  assert len(load_metadata(str(tmp_path / 'metadata'), 'SYNTH', 'train')) == 20
