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


def _cfg(root, metadata_root='', **syn):
  return ConfigDict(
    dict(
      dataset_name='SYNTH',
      data_root=str(root),
      metadata_root=metadata_root,
      synthetic={**SMALL, 'num_train': 20, 'num_val': 0, 'num_test': 10, 'generate': True, **syn},
    )
  )


def _tree(root):
  return sorted(
    os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
  )


def test_ensure_synthetic_idempotent_and_regenerates_on_new_params(tmp_path):
  cfg = _cfg(tmp_path / 'd')
  synthetic.ensure_synthetic(cfg)
  img = tmp_path / 'd' / 'images/train/00000.jpg'
  stamp = img.stat().st_mtime_ns
  synthetic.ensure_synthetic(cfg)  # Complete: nothing rewritten.
  assert img.stat().st_mtime_ns == stamp
  assert sorted(os.listdir(tmp_path)) == ['d']  # No temporary folders left next to it.
  cfg.synthetic.num_test = 12  # Other parameters: the generated set is replaced.
  cfg.metadata_root = str(tmp_path / 'meta')
  synthetic.ensure_synthetic(cfg)
  assert len(load_metadata(cfg.metadata_root, 'SYNTH', 'test')) == 12
  assert len(load_metadata(str(tmp_path / 'd' / 'metadata'), 'SYNTH', 'test')) == 12
  assert sorted(os.listdir(tmp_path)) == ['d', 'meta']


def test_ensure_synthetic_into_existing_empty_folder(tmp_path):
  (tmp_path / 'd').mkdir()
  synthetic.ensure_synthetic(_cfg(tmp_path / 'd'))
  assert (tmp_path / 'd' / '.complete').exists()


@pytest.mark.parametrize('marker', [False, True])
def test_ensure_synthetic_never_deletes_user_files(tmp_path, marker):
  """A folder holding anything but a complete generated set is refused and left as it was."""
  root = tmp_path / 'd'
  if marker:  # A generated set with other parameters, plus a file the user added.
    synthetic.ensure_synthetic(_cfg(root))
    (root / 'notes.txt').write_text('mine')
    cfg = _cfg(root, num_test=12)
  else:  # The user's own images, no marker.
    for sub in ('images', 'masks'):
      (root / sub).mkdir(parents=True)
      (root / sub / 'precious.jpg').write_text('x')
    cfg = _cfg(root)
  before = _tree(root)
  with pytest.raises(FileExistsError, match='not a complete generated SYNTH set') as e:
    synthetic.ensure_synthetic(cfg)
  assert str(root) in str(e.value)
  assert ('notes.txt' if marker else 'images') in str(e.value)
  assert _tree(root) == before and sorted(os.listdir(tmp_path)) == ['d']


def test_ensure_synthetic_refuses_to_replace_foreign_metadata_copy(tmp_path):
  (tmp_path / 'meta' / 'SYNTH').mkdir(parents=True)
  (tmp_path / 'meta' / 'SYNTH' / 'mine.txt').write_text('x')
  with pytest.raises(FileExistsError, match='mine.txt'):
    synthetic.ensure_synthetic(_cfg(tmp_path / 'd', metadata_root=str(tmp_path / 'meta')))
  assert _tree(tmp_path / 'meta') == ['SYNTH/mine.txt']


def test_interrupted_generation_leaves_the_target_untouched(tmp_path, monkeypatch):
  def boom(*args, **kw):
    raise KeyboardInterrupt

  monkeypatch.setattr(synthetic, '_write_metadata', boom)
  with pytest.raises(KeyboardInterrupt):
    synthetic.ensure_synthetic(_cfg(tmp_path / 'd'))
  assert os.listdir(tmp_path) == []  # Neither a half-written set nor its temporary folder.
  # A run killed outright leaves its temporary folder: the next run names it and keeps it (only
  # folders a run created itself are deleted: a sibling with that name may be the user's).
  stale = tmp_path / '.d.generating-12345'
  (stale / 'images').mkdir(parents=True)
  monkeypatch.undo()
  synthetic.ensure_synthetic(_cfg(tmp_path / 'd'))
  assert sorted(os.listdir(tmp_path)) == ['.d.generating-12345', 'd']


def test_generate_false_needs_an_existing_set_and_keeps_user_files(tmp_path):
  """generate=False: the loaders use what is there and never write; a missing set is an error
  that says how to generate it."""
  from dualsig_jax.data import loaders

  root = tmp_path / 'user'
  for sub in ('images', 'masks'):
    (root / sub).mkdir(parents=True)
    (root / sub / 'precious.jpg').write_text('x')
  cfg = _cfg(root, generate=False)
  cfg.update(dict(source='folder', train_split='train', eval_size=48, num_workers=0))
  before = _tree(root)
  with pytest.raises(FileNotFoundError, match='synthetic.generate=True') as e:
    loaders.make_eval_loader(cfg, 'test', batch_size=4)
  assert 'python -m dualsig_jax.data.synthetic' in str(e.value)
  with pytest.raises(FileNotFoundError, match='synthetic.generate=True'):
    loaders.steps_per_epoch(cfg, 4)
  assert _tree(root) == before
  # generate=True on the same folder: refused, still nothing deleted.
  cfg.synthetic.generate = True
  with pytest.raises(FileExistsError):
    loaders.make_eval_loader(cfg, 'test', batch_size=4)
  assert _tree(root) == before


def test_cli_tiny_preset(tmp_path, capsys):
  synthetic.main(
    ['--out', str(tmp_path), '--preset', 'tiny', '--num_train', '20', '--workers', '1']
  )
  assert 'wrote 140 images' in capsys.readouterr().out
  assert (tmp_path / '.complete').exists()
  assert len(load_metadata(str(tmp_path / 'metadata'), 'SYNTH', 'train')) == 20


def _tiny(out, seed=0):
  synthetic.main(
    ['--out', str(out), '--preset', 'tiny', '--workers', '1', '--seed', str(seed)]
    + ['--num_train', '6', '--num_val', '2', '--num_test', '2']
  )


@pytest.mark.parametrize('rel', ['images/mine.txt', 'metadata/SYNTH/notes.txt', 'masks/val/x'])
def test_regeneration_keeps_or_refuses_files_it_did_not_write(tmp_path, rel):
  """A user file anywhere inside a generated set: regeneration refuses, naming it."""
  out = tmp_path / 'set'
  _tiny(out)
  (out / rel).write_text('k')
  before = _tree(out)
  with pytest.raises(SystemExit, match=rel):
    _tiny(out, seed=2)
  assert _tree(out) == before and (out / rel).read_text() == 'k'


def test_a_sibling_named_like_a_backup_survives(tmp_path):
  """Only folders this run created may be removed, whatever the siblings are called."""
  for name in ('.set.old-bak', '.set.generating-x'):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'f').write_text('mine')
  _tiny(tmp_path / 'set')
  _tiny(tmp_path / 'set', seed=2)  # replaces the set: its own temporaries come and go
  assert sorted(os.listdir(tmp_path)) == ['.set.generating-x', '.set.old-bak', 'set']
  assert (tmp_path / '.set.old-bak' / 'f').read_text() == 'mine'


def test_the_set_follows_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    _tiny(tmp_path / 'set')
  finally:
    os.umask(old)
  assert oct(os.stat(tmp_path / 'set').st_mode & 0o777) == oct(0o755)
