"""make_metadata: ImageFolder -> wsolevaluation train metadata, without overwriting a split."""

import os

import pytest
from PIL import Image

from dualsig_jax.data import make_metadata, resolve_metadata_root
from dualsig_jax.data.metadata import load_metadata


def _folder(tmp_path):
  folder = tmp_path / 'ILSVRC' / 'train'
  for wnid, n in [('n02', 2), ('n01', 3)]:
    (folder / wnid).mkdir(parents=True)
    for k in range(n):
      Image.new('RGB', (8, 8)).save(folder / wnid / f'{wnid}_{k}.JPEG')
  (folder / 'n01' / 'notes.txt').write_text('not an image')
  return folder


def _args(folder, out, *extra):
  return ['--image_folder', str(folder), '--out', str(out), '--dataset_name', 'ILSVRC', *extra]


def test_make_metadata_image_folder(tmp_path, capsys):
  folder = _folder(tmp_path)
  make_metadata.main(_args(folder, tmp_path / 'meta', '--split', 'train'))
  assert 'wrote 5 images of 2 classes' in capsys.readouterr().out
  m = load_metadata(str(tmp_path / 'meta'), 'ILSVRC', 'train')
  assert m.image_ids[0] == 'train/n01/n01_0.JPEG' and m.labels['train/n01/n01_0.JPEG'] == 0
  assert m.labels['train/n02/n02_1.JPEG'] == 1 and len(m) == 5
  with pytest.raises(FileNotFoundError):
    make_metadata.scan_image_folder(str(tmp_path / 'nope'))


def test_make_metadata_refuses_existing_split_without_overwrite(tmp_path):
  folder = _folder(tmp_path)
  make_metadata.main(_args(folder, tmp_path / 'meta'))
  ids = tmp_path / 'meta' / 'ILSVRC' / 'train' / 'image_ids.txt'
  ids.write_text('train/n01/n01_0.JPEG\n')
  with pytest.raises(SystemExit, match='--overwrite'):
    make_metadata.main(_args(folder, tmp_path / 'meta'))
  assert ids.read_text() == 'train/n01/n01_0.JPEG\n'
  make_metadata.main(_args(folder, tmp_path / 'meta', '--overwrite'))
  assert len(load_metadata(str(tmp_path / 'meta'), 'ILSVRC', 'train')) == 5


def test_make_metadata_refuses_the_shipped_folder(tmp_path, monkeypatch):
  folder = _folder(tmp_path)
  shipped = resolve_metadata_root('')
  before = sorted(os.listdir(os.path.join(shipped, 'ILSVRC')))
  for out in (shipped, os.path.join(shipped, '.')):
    with pytest.raises(SystemExit, match='shipped'):
      make_metadata.main(_args(folder, out, '--overwrite'))
  # Relative to a cwd from which 'metadata' is the shipped folder, too.
  monkeypatch.chdir(os.path.dirname(shipped))
  with pytest.raises(SystemExit, match='shipped'):
    make_metadata.main(_args(folder, os.path.basename(shipped), '--overwrite'))
  assert sorted(os.listdir(os.path.join(shipped, 'ILSVRC'))) == before
