"""wsolevaluation metadata: the shipped set (found from any cwd, installed as package data),
malformed / inconsistent files named by file:line, labels vs the model's class count, and
ids that would leave the data root."""

import fnmatch
import os
import tomllib

import data_helpers
import pytest
from data_helpers import append_line, edit_line, meta_file
from ml_collections import ConfigDict

from dualsig_jax.data import check_labels, loaders, resolve_metadata_root
from dualsig_jax.data.metadata import MetadataError, load_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = resolve_metadata_root('')

# ----------------------------------------------------------------------------- shipped metadata

# Fixtures shared with the other data tests (bound here so pytest finds them).
# (`data` here: a metadata copy whose images/ and masks/ link to the shared set.)
synth_dir, data = data_helpers.synth_dir, data_helpers.metadata_only_data


def test_shipped_cub_test():
  m = load_metadata(SHIPPED, 'CUB', 'test')
  assert len(m.image_ids) == 5794
  assert all(len(m.boxes[i]) >= 1 for i in m.image_ids)
  assert set(m.labels.values()) == set(range(200))
  i = m.image_ids[0]
  assert m.boxes[i].tolist() == [[60, 27, 385, 331]] and m.sizes[i] == (500, 335)
  assert m.where[i].endswith('image_ids.txt:1')


def test_shipped_openimages_test_masks_paired():
  m = load_metadata(SHIPPED, 'OpenImages', 'test')
  assert len(m.image_ids) == 5000 and not m.boxes and not m.sizes
  with open(os.path.join(SHIPPED, 'OpenImages', 'test', 'localization.txt')) as f:
    rows = [line.rstrip('\n').split(',') for line in f if line.strip()]
  assert sum(len(m.masks[i][0]) for i in m.image_ids) == len(rows)
  first = {}
  for image_id, mask, ignore in rows:
    first.setdefault(image_id, (mask, ignore))
  for i in m.image_ids:
    masks, ignore = m.masks[i]
    assert (masks[0], ignore) == first[i]
    assert ignore.endswith('_ignore.png') and ignore.startswith(os.path.dirname(i))
    assert all(p.startswith(i[: -len('.jpg')]) for p in masks)


@pytest.mark.parametrize(
  'name,split,n',
  [
    ('CUB', 'train', 5994),
    ('CUB', 'val', 1000),
    ('CARS', 'train', 8144),
    ('CARS', 'test', 8041),
    ('ILSVRC', 'val', 10000),
    ('ILSVRC', 'test', 50000),
    ('OpenImages', 'train', 29819),
    ('OpenImages', 'val', 2500),
  ],
)
def test_shipped_metadata_parses(name, split, n):
  # Also: every shipped box lies inside its image (the bounds check refuses nothing there).
  assert len(load_metadata(SHIPPED, name, split)) == n


def test_shipped_metadata_found_from_any_cwd(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for name in ('', 'metadata'):
    root = resolve_metadata_root(name)
    assert os.path.isabs(root)
    assert os.path.isfile(os.path.join(root, 'CUB', 'test', 'image_ids.txt'))
  cfg = ConfigDict(dict(dataset_name='CUB', data_root=str(tmp_path), metadata_root='metadata'))
  assert len(loaders.load_split(cfg, 'test')) == 5794
  # Any other path is the user's, relative to the cwd, and must exist.
  (tmp_path / 'mine' / 'CUB').mkdir(parents=True)
  assert resolve_metadata_root('mine') == 'mine'
  with pytest.raises(FileNotFoundError, match="'elsewhere'.*does not exist") as e:
    resolve_metadata_root('elsewhere')
  assert str(tmp_path) in str(e.value)  # Says which cwd a relative path was resolved against.


def test_packaging_installs_every_package_and_the_metadata():
  """pyproject lists packages explicitly (the metadata maps in from the top-level folder): the
  list must match the tree, and the metadata must be package data."""
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    st = tomllib.load(f)['tool']['setuptools']
  on_disk = {
    os.path.relpath(d, ROOT).replace(os.sep, '.')
    for d, _, files in os.walk(os.path.join(ROOT, 'dualsig_jax'))
    if '__init__.py' in files
  }
  assert set(st['packages']) == on_disk | {'dualsig_jax.metadata'}
  assert st['package-dir'] == {'dualsig_jax.metadata': 'metadata'}
  patterns = st['package-data']['dualsig_jax.metadata']
  shipped = {
    os.path.relpath(os.path.join(d, f), os.path.join(ROOT, 'metadata'))
    for d, _, files in os.walk(os.path.join(ROOT, 'metadata'))
    for f in files
  }
  assert shipped and all(any(fnmatch.fnmatch(p, pat) for pat in patterns) for p in shipped)


# ----------------------------------------------------------------------------- malformed metadata


@pytest.mark.parametrize(
  'fname,lineno,line,pattern',
  [
    ('class_labels.txt', 3, 'images/train/00002.jpg', 'expected 2 fields'),
    ('class_labels.txt', 3, 'images/train/00002.jpg,three', 'expected integer label'),
    ('class_labels.txt', 3, 'images/train/00002.jpg,10', 'label 10 out of range'),
    ('class_labels.txt', 3, 'images/train/00002.jpg,-1', 'label -1 out of range'),
    ('localization.txt', 4, 'images/train/00003.jpg,30,5,20,9', 'invalid box'),
    ('localization.txt', 4, 'images/train/00003.jpg,1,2,3', 'expected 5 fields'),
    ('localization.txt', 4, 'images/train/00003.jpg,1,2,3.5,9', 'expected integer box'),
    ('localization.txt', 4, 'images/train/00003.jpg,1,2,3000,9', 'outside the image'),
    ('localization.txt', 4, 'images/train/00003.jpg,1,2,3,9000', 'outside the image'),
    ('image_sizes.txt', 5, 'images/train/00004.jpg,64', 'expected 3 fields'),
    ('image_sizes.txt', 5, 'images/train/00004.jpg,64,x', 'expected integer'),
  ],
)
def test_malformed_metadata_names_file_and_line(data, fname, lineno, line, pattern):
  path = meta_file(data, 'train', fname)
  edit_line(path, lineno, line)
  with pytest.raises(MetadataError, match=pattern) as e:
    loaders.load_split(data, 'train')
  assert f'{path}:{lineno}' in str(e.value)


def test_box_on_the_image_border_accepted(data):
  # wsolevaluation boxes are x0,y0,x0+w,y0+h: x1 == width is inside (Stanford Cars has such).
  w, h = loaders.load_split(data, 'train').sizes['images/train/00003.jpg']
  edit_line(meta_file(data, 'train', 'localization.txt'), 4, f'images/train/00003.jpg,0,0,{w},{h}')
  m = loaders.load_split(data, 'train')
  assert m.boxes['images/train/00003.jpg'].tolist() == [[0, 0, w, h]]


@pytest.mark.parametrize('fname,value', [('class_labels.txt', '7'), ('image_sizes.txt', '50,60')])
def test_conflicting_duplicate_names_both_lines(data, fname, value):
  path = meta_file(data, 'train', fname)
  with open(path) as f:
    lines = f.read().splitlines()
  first = lines[2].split(',')[0]  # Line 3's id, listed again at the end with another value.
  if lines[2] == f'{first},{value}':
    value = '8' if fname == 'class_labels.txt' else '51,60'
  append_line(path, f'{first},{value}')
  with pytest.raises(MetadataError, match='conflicting') as e:
    loaders.load_split(data, 'train')
  assert f'{path}:3' in str(e.value) and f'{path}:{len(lines) + 1}' in str(e.value)


def test_identical_duplicate_line_accepted(data):
  path = meta_file(data, 'train', 'class_labels.txt')
  with open(path) as f:
    line3 = f.read().splitlines()[2]
  append_line(path, line3)
  assert len(loaders.load_split(data, 'train')) == 200


@pytest.mark.parametrize(
  'fname,what',
  [
    ('class_labels.txt', 'no label'),
    ('image_sizes.txt', 'no size'),
    ('localization.txt', 'no box'),
  ],
)
def test_image_id_without_label_size_or_box(data, fname, what):
  path = meta_file(data, 'train', fname)
  edit_line(path, 7, '')  # Blank line: the id of image_ids.txt:7 loses its entry.
  with pytest.raises(MetadataError, match=what) as e:
    loaders.load_split(data, 'train')
  assert 'image_ids.txt:7' in str(e.value)


def test_mask_ignore_on_non_first_line_rejected(data):
  path = meta_file(data, 'test', 'localization_mask.txt')
  append_line(path, 'images/test/00000.jpg,masks/test/00001.png,masks/test/00001_ignore.png')
  with pytest.raises(MetadataError, match='non-first line'):
    loaders.load_split(data, 'test')


# ----------------------------------------------------------------------------- labels vs model


def test_check_labels_names_first_offending_line_and_max(data):
  m = loaders.load_split(data, 'train')
  check_labels(m, 10)  # SYNTH tiny: labels 0..9.
  path = meta_file(data, 'train', 'class_labels.txt')
  with open(path) as f:
    labels = [int(line.split(',')[1]) for line in f if line.strip()]
  first = next(k for k, v in enumerate(labels, 1) if v >= 7)
  with pytest.raises(MetadataError, match='num_classes=7') as e:
    check_labels(m, 7)
  assert f'{path}:{first}' in str(e.value) and 'largest label 9' in str(e.value)
  with pytest.raises(ValueError, match='num_classes'):
    check_labels(m, 0)


def test_loaders_check_labels_when_given_num_classes(data):
  with pytest.raises(MetadataError, match='num_classes=5'):
    loaders.make_train_loader(
      data, seed=0, num_epochs=1, process_index=0, process_count=1, batch_size=8, num_classes=5
    )
  with pytest.raises(MetadataError, match='num_classes=9'):
    loaders.make_eval_loader(data, 'test', batch_size=8, num_classes=9)
  assert len(loaders.make_eval_loader(data, 'test', batch_size=8, num_classes=10)) == 10


# ----------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
  'bad_id', ['../outside.jpg', '/etc/passwd', 'images/../../x.jpg', '~/x.jpg']
)
def test_ids_outside_data_root_refused(data, bad_id):
  for fname in ('image_ids.txt', 'class_labels.txt'):
    path = meta_file(data, 'train', fname)
    edit_line(path, 2, bad_id + (',0' if fname == 'class_labels.txt' else ''))
  with pytest.raises(MetadataError, match='outside the data root') as e:
    loaders.load_split(data, 'train')
  assert 'image_ids.txt:2' in str(e.value)


@pytest.mark.parametrize('bad', ['../m.png', '/tmp/m.png'])
def test_mask_paths_outside_root_refused(data, bad):
  path = meta_file(data, 'test', 'localization_mask.txt')
  edit_line(path, 1, f'images/test/00000.jpg,{bad},masks/test/00000_ignore.png')
  with pytest.raises(MetadataError, match='outside the data root') as e:
    loaders.make_eval_loader(data, 'test', batch_size=8)
  assert f'{path}:1' in str(e.value)


def test_user_metadata_root_lacking_a_split_reads_the_shipped_one(tmp_path):
  """make_metadata writes ILSVRC train into the user's folder; test still comes from the
  shipped copy (metadata_root names the user's folder)."""
  d = tmp_path / 'mine' / 'CUB' / 'train'
  d.mkdir(parents=True)
  (d / 'image_ids.txt').write_text('a/1.jpg\na/2.jpg\n')
  (d / 'class_labels.txt').write_text('a/1.jpg,0\na/2.jpg,1\n')
  cfg = ConfigDict(
    dict(dataset_name='CUB', data_root=str(tmp_path), metadata_root=str(d.parent.parent))
  )
  assert loaders.load_split(cfg, 'train').image_ids == ['a/1.jpg', 'a/2.jpg']
  test = loaders.load_split(cfg, 'test')
  assert len(test) == 5794 and test.root.startswith(SHIPPED)


def _bom_split(tmp_path, ids_text, labels_text):
  d = tmp_path / 'SYNTH' / 'train'
  d.mkdir(parents=True)
  (d / 'image_ids.txt').write_bytes(ids_text.encode('utf-8'))
  (d / 'class_labels.txt').write_bytes(labels_text.encode('utf-8'))
  return d


def test_a_utf8_bom_at_the_start_of_a_file_is_read_as_text(tmp_path):
  """Windows editors save UTF-8 with a byte-order mark; it must not become part of an id."""
  ids, labels = '\ufeffimages/a.jpg\nimages/b.jpg\n', '\ufeffimages/a.jpg,0\nimages/b.jpg,1\n'
  _bom_split(tmp_path, ids, labels)
  m = load_metadata(str(tmp_path), 'SYNTH', 'train', num_classes=2)
  assert m.image_ids == ['images/a.jpg', 'images/b.jpg']
  assert m.labels == {'images/a.jpg': 0, 'images/b.jpg': 1}


def test_a_bom_inside_a_file_is_refused_at_its_line(tmp_path):
  """A second BOM (two files pasted together) is invisible in an editor: named at file:line."""
  d = _bom_split(tmp_path, 'images/a.jpg\n\ufeffimages/b.jpg\n', 'images/a.jpg,0\nimages/b.jpg,1\n')
  with pytest.raises(MetadataError, match=rf'{d / "image_ids.txt"}:2: .*byte-order mark'):
    load_metadata(str(tmp_path), 'SYNTH', 'train', num_classes=2)
