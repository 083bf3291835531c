"""Data pipeline tests: shipped metadata, bad inputs, loaders (padding, determinism,
sharding, checkpointing), TFDS adapter, ImageFolder metadata command.

All image tests run on the tiny SYNTH preset (a few hundred 64-px images)."""

import os
import shutil

import cv2
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from dualsig_jax.data import loaders, make_metadata, synthetic
from dualsig_jax.data.metadata import MetadataError, load_metadata
from dualsig_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BadImageError

SHIPPED = loaders.SHIPPED_METADATA


@pytest.fixture(scope='session')
def synth_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('synth'))
  synthetic.generate(out, **synthetic.PRESETS['tiny'], workers=1)
  return out


@pytest.fixture
def data(synth_dir, tmp_path):
  """A private copy of the tiny set (tests corrupt it) and a config pointing at it."""
  root = str(tmp_path / 'synth')
  shutil.copytree(synth_dir, root)
  cfg = ConfigDict(
    dict(
      source='folder',
      dataset_name='SYNTH',
      data_root=root,
      metadata_root='',
      train_split='train',
      eval_split='test',
      resize_size=72,
      crop_size=64,
      eval_size=64,
      batch_size=16,
      num_workers=0,
      skip_bad_images=False,
      synthetic=dict(synthetic.PRESETS['tiny']),
      tfds=dict(name='', data_dir=''),
    )
  )
  # Mark complete so ensure_synthetic leaves the (soon corrupted) copy alone.
  with open(os.path.join(root, '.complete'), 'w') as f:
    import json

    json.dump({k: int(v) for k, v in synthetic.PRESETS['tiny'].items()}, f)
  return cfg


def _meta_file(cfg, split, name):
  return os.path.join(cfg.data_root, 'metadata', 'SYNTH', split, name)


def _edit_line(path, lineno, new):
  with open(path) as f:
    lines = f.read().splitlines()
  lines[lineno - 1] = new
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def _train(cfg, **kw):
  args = dict(seed=0, num_epochs=1, process_index=0, process_count=1, batch_size=16)
  args.update(kw)
  return loaders.make_train_loader(cfg, **args)


# ----------------------------------------------------------------------------- shipped metadata


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
  assert len(load_metadata(SHIPPED, name, split)) == n


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
    ('image_sizes.txt', 5, 'images/train/00004.jpg,64', 'expected 3 fields'),
    ('image_sizes.txt', 5, 'images/train/00004.jpg,64,x', 'expected integer'),
  ],
)
def test_malformed_metadata_names_file_and_line(data, fname, lineno, line, pattern):
  path = _meta_file(data, 'train', fname)
  _edit_line(path, lineno, line)
  with pytest.raises(MetadataError, match=pattern) as e:
    loaders.load_split(data, 'train')
  assert f'{path}:{lineno}' in str(e.value)


@pytest.mark.parametrize(
  'fname,what',
  [
    ('class_labels.txt', 'no label'),
    ('image_sizes.txt', 'no size'),
    ('localization.txt', 'no box'),
  ],
)
def test_image_id_without_label_size_or_box(data, fname, what):
  path = _meta_file(data, 'train', fname)
  _edit_line(path, 7, '')  # Blank line: the id of image_ids.txt:7 loses its entry.
  with pytest.raises(MetadataError, match=what) as e:
    loaders.load_split(data, 'train')
  assert 'image_ids.txt:7' in str(e.value)


def test_mask_ignore_on_non_first_line_rejected(data):
  path = _meta_file(data, 'test', 'localization_mask.txt')
  with open(path, 'a') as f:
    f.write('images/test/00000.jpg,masks/test/00001.png,masks/test/00001_ignore.png\n')
  with pytest.raises(MetadataError, match='non-first line'):
    loaders.load_split(data, 'test')


@pytest.mark.parametrize(
  'bad_id', ['../outside.jpg', '/etc/passwd', 'images/../../x.jpg', '~/x.jpg']
)
def test_ids_outside_data_root_refused(data, bad_id):
  for fname in ('image_ids.txt', 'class_labels.txt'):
    path = _meta_file(data, 'train', fname)
    _edit_line(path, 2, bad_id + (',0' if fname == 'class_labels.txt' else ''))
  with pytest.raises(MetadataError, match='outside the data root') as e:
    loaders.load_split(data, 'train')
  assert 'image_ids.txt:2' in str(e.value)


def test_symlink_escaping_data_root_refused(data, tmp_path):
  outside = tmp_path / 'outside'
  outside.mkdir()
  shutil.copy(os.path.join(data.data_root, 'images/test/00001.jpg'), outside / '00001.jpg')
  target = os.path.join(data.data_root, 'images/test')
  shutil.rmtree(target)
  os.symlink(outside, target)
  with pytest.raises(MetadataError, match='outside the data root'):
    next(iter(loaders.make_eval_loader(data, 'test', batch_size=8)))


# ----------------------------------------------------------------------------- bad images


def _image_path(cfg, split, k):
  return os.path.join(cfg.data_root, 'images', split, f'{k:05d}.jpg')


def test_missing_image_names_file_and_line(data):
  os.remove(_image_path(data, 'test', 3))
  with pytest.raises(BadImageError, match='not found') as e:
    list(loaders.make_eval_loader(data, 'test', batch_size=8))
  assert 'images/test/00003.jpg' in str(e.value) and 'image_ids.txt:4' in str(e.value)


@pytest.mark.parametrize('how', ['truncated', 'garbage'])
def test_corrupt_image_names_file_and_line(data, how):
  path = _image_path(data, 'train', 0)
  with open(path, 'rb') as f:
    raw = f.read()
  with open(path, 'wb') as f:
    f.write(raw[: len(raw) // 2] if how == 'truncated' else b'not a jpeg at all' * 10)
  with pytest.raises(BadImageError, match='cannot decode') as e:
    for _ in _train(data):
      pass
  assert 'images/train/00000.jpg' in str(e.value) and 'image_ids.txt:1' in str(e.value)


def test_gray_cmyk_rgba_converted(data):
  rgb = {}
  for k, mode in [(0, 'L'), (1, 'CMYK'), (2, 'RGBA'), (3, 'P')]:
    path = _image_path(data, 'test', k)
    img = Image.open(path).convert(mode)
    rgb[k] = img.convert('RGB')
    img.save(path, format='PNG' if mode in ('RGBA', 'P') else 'JPEG', quality=95)
    rgb[k] = Image.open(path).convert('RGB')  # What the file decodes to, as RGB.
  batch = next(iter(loaders.make_eval_loader(data, 'test', batch_size=8)))
  assert batch['image'].shape == (8, 64, 64, 3) and np.isfinite(batch['image']).all()
  for k, img in rgb.items():
    want = (np.asarray(img.resize((64, 64), Image.BILINEAR)) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(batch['image'][k], want, atol=1e-5)
  gray = batch['image'][0] * IMAGENET_STD + IMAGENET_MEAN
  np.testing.assert_allclose(gray[..., 0], gray[..., 1], atol=1e-5)


def test_skip_bad_images_train_only(data):
  os.remove(_image_path(data, 'train', 5))
  with open(_image_path(data, 'train', 9), 'wb') as f:
    f.write(b'garbage')
  data.skip_bad_images = True
  loader = _train(data, batch_size=10)
  n = sum(len(b['label']) for b in loader)
  assert n == 190  # 198 good images -> 19 full batches of 10.
  assert loader.skip_report.count() == 2
  ids = [e[0] for e in loader.skip_report.entries()]
  assert ids == ['images/train/00005.jpg', 'images/train/00009.jpg']
  assert 'image_ids.txt:6' in loader.skip_report.entries()[0][1]
  assert 'skipped 2' in loader.skip_report.summary()
  os.remove(_image_path(data, 'test', 5))
  with pytest.raises(BadImageError):  # Evaluation never skips.
    list(loaders.make_eval_loader(data, 'test', batch_size=8))


def test_missing_mask_file_raises(data):
  os.remove(os.path.join(data.data_root, 'masks/test/00002_ignore.png'))
  with pytest.raises(BadImageError, match='00002_ignore.png'):
    list(loaders.make_eval_loader(data, 'test', batch_size=8))


# ----------------------------------------------------------------------------- eval loader


def _reference_mask(root, mask_paths, ignore_path, size):
  """wsolevaluation's get_mask, restated."""

  def load(p):
    m = np.float32(cv2.imread(os.path.join(root, p), cv2.IMREAD_GRAYSCALE))
    return cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 0.5

  fg = np.stack([load(p) for p in mask_paths]).any(0)
  ign = load(ignore_path) & ~fg
  return fg.astype(np.uint8) + 255 * ign.astype(np.uint8)


def test_eval_batches_padding_boxes_masks(data):
  loader = loaders.make_eval_loader(data, 'test', batch_size=32)
  meta = loader.metadata
  batches = list(loader)
  assert len(loader) == len(batches) == 3  # 80 images.
  for b in batches:
    assert b['image'].shape == (32, 64, 64, 3) and b['image'].dtype == np.float32
    assert b['mask'].shape == (32, 64, 64) and b['mask'].dtype == np.uint8
    assert b['boxes'].shape == (32, 1, 4) and b['boxes'].dtype == np.int32
    for k in ('label', 'index', 'num_boxes'):
      assert b[k].dtype == np.int32
    assert b['valid'].dtype == np.bool_
  last = batches[-1]
  assert last['valid'].tolist() == [True] * 16 + [False] * 16
  assert (last['index'][16:] == -1).all() and (last['mask'][16:] == 255).all()
  assert (last['image'][16:] == 0).all() and (last['num_boxes'][16:] == 0).all()
  index = np.concatenate([b['index'][b['valid']] for b in batches])
  assert index.tolist() == list(range(80))
  for b in batches:
    for row in np.nonzero(b['valid'])[0]:
      image_id = meta.image_ids[b['index'][row]]
      assert b['label'][row] == meta.labels[image_id]
      w, h = meta.sizes[image_id]
      want = [
        [int(x0 * 64 / w), int(y0 * 64 / h), int(x1 * 64 / w), int(y1 * 64 / h)]
        for x0, y0, x1, y1 in meta.boxes[image_id].tolist()
      ]
      assert b['boxes'][row, : b['num_boxes'][row]].tolist() == want
      ref = _reference_mask(data.data_root, *meta.masks[image_id], 64)
      np.testing.assert_array_equal(b['mask'][row], ref)
  assert set(np.unique(batches[0]['mask'])) == {0, 1, 255}


def test_eval_worker_processes_same_batches(data):
  ref = list(loaders.make_eval_loader(data, 'test', batch_size=24))
  data.num_workers = 2
  got = list(loaders.make_eval_loader(data, 'test', batch_size=24))
  assert len(got) == len(ref) == 4
  for x, y in zip(ref, got):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_eval_sharding_covers_all_once(data):
  seen = []
  lens = set()
  for p in range(3):
    loader = loaders.make_eval_loader(data, 'test', batch_size=8, process_index=p, process_count=3)
    lens.add(len(loader))
    for b in loader:
      seen += b['index'][b['valid']].tolist()
  assert lens == {4}  # ceil(80 / 24): every process runs the same number of steps.
  assert sorted(seen) == list(range(80))


# ----------------------------------------------------------------------------- train loader


def _fingerprint(image):
  # Row sums survive a horizontal flip, so with crop == resize this identifies the image.
  pixels = np.round((image * IMAGENET_STD + IMAGENET_MEAN) * 255).astype(np.int64)
  return tuple(pixels.sum(axis=(1, 2)))


def test_train_batches_and_determinism(data):
  a = list(_train(data, seed=3))
  b = list(_train(data, seed=3))
  c = list(_train(data, seed=4))
  assert len(a) == 200 // 16 and a[0]['image'].shape == (16, 64, 64, 3)
  assert a[0]['image'].dtype == np.float32 and a[0]['label'].dtype == np.int32
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert not np.array_equal(a[0]['label'], c[0]['label'])
  assert loaders.steps_per_epoch(data, 16) == 12


def test_train_batch_normalization_matches_per_image_transform(data):
  # The loader crops uint8 per image and normalizes once per batch (less copying); the
  # values must be exactly those of the per-image float transform on the same records/rngs.
  import grain.python as grain

  from dualsig_jax.data import transforms

  class PerImage(grain.RandomMapTransform):
    def random_map(self, element, rng):
      return {
        'image': transforms.train_transform(element['image'], rng, 72, 64),
        'label': np.int32(element['label']),
      }

  source, _ = loaders._build_source(data, 'train')
  shard = grain.ShardOptions(shard_index=0, shard_count=1, drop_remainder=True)
  sampler = grain.IndexSampler(
    num_records=len(source), shard_options=shard, shuffle=True, num_epochs=1, seed=5
  )
  ref = grain.DataLoader(
    data_source=source,
    sampler=sampler,
    shard_options=shard,
    operations=[PerImage(), grain.Batch(16, drop_remainder=True)],
  )
  got = list(_train(data, seed=5))
  assert len(got) == 200 // 16
  for x, y in zip(got, ref):
    assert x['image'].dtype == y['image'].dtype == np.float32
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  crops = [np.random.default_rng(i).integers(0, 256, (5, 7, 3), dtype=np.uint8) for i in range(3)]
  np.testing.assert_array_equal(
    transforms.normalize_batch(crops), np.stack([transforms.normalize(c) for c in crops])
  )


def test_train_worker_processes_match_in_process(data):
  ref = list(_train(data, seed=1, batch_size=20))
  data.num_workers = 2
  got = list(_train(data, seed=1, batch_size=20))
  assert len(got) == len(ref) == 10

  # grain hands records to workers round-robin and each worker batches its own, so batch
  # composition depends on the worker count; the records and their augmentations do not.
  def rows(batches):
    return sorted(
      img.tobytes() + lab.tobytes() for b in batches for img, lab in zip(b['image'], b['label'])
    )

  assert rows(got) == rows(ref)


def test_train_sharding_disjoint(data):
  data.resize_size = data.crop_size = data.eval_size = 64
  ev = loaders.make_eval_loader(data, 'train', batch_size=50)
  ids = {}
  for b in ev:
    for img, i in zip(b['image'], b['index']):
      ids[_fingerprint(img)] = int(i)
  assert len(ids) == 200
  shards = []
  for p in range(2):
    got = [
      ids[_fingerprint(img)]
      for batch in _train(data, process_index=p, process_count=2, batch_size=10)
      for img in batch['image']
    ]
    assert len(got) == len(set(got)) == 100
    shards.append(set(got))
  assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 200


def test_train_iterator_state_restore(data, tmp_path):
  it = iter(_train(data, num_epochs=None))
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  it2 = iter(_train(data, num_epochs=None))
  it2.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(it2)['image'], w['image'])
  # The orbax handler named in the design.
  import grain.python as grain
  import orbax.checkpoint as ocp

  it3 = iter(_train(data, num_epochs=None))
  for _ in range(3):
    next(it3)
  ckpt = ocp.Checkpointer(grain.PyGrainCheckpointHandler())
  ckpt.save(str(tmp_path / 'it'), it3)
  it4 = iter(_train(data, num_epochs=None))
  ckpt.restore(str(tmp_path / 'it'), it4)
  np.testing.assert_array_equal(next(it4)['image'], want[0]['image'])


def test_unknown_source_rejected(data):
  data.source = 'webdataset'
  with pytest.raises(ValueError, match="valid: \\['folder', 'tfds'\\]"):
    _train(data)


# ----------------------------------------------------------------------------- TFDS


class _FakeTfds:
  """Stands in for tfds.data_source(...): records as the caltech_birds2011 builder yields."""

  def __init__(self, n=12):
    rng = np.random.default_rng(0)
    self.records = []
    for i in range(n):
      h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
      shape = [(h, w, 3), (h, w, 1), (h, w, 4)][i % 3]
      rec = {
        'image': rng.integers(0, 255, shape, dtype=np.uint8),
        'label': i % 5,
        'image/filename': f'{i}.jpg',
      }
      box = np.array([0.1, 0.2, 0.7, 0.9], np.float32)  # ymin, xmin, ymax, xmax
      if i % 2:
        rec['bbox'] = box
      else:
        rec['objects'] = {'bbox': np.stack([box, box / 2])}
      self.records.append(rec)

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


def test_tfds_source_with_fake_records(data, monkeypatch):
  import tensorflow_datasets as tfds

  fake = _FakeTfds()
  calls = []
  monkeypatch.setattr(
    tfds,
    'data_source',
    lambda name, split, data_dir=None, download=True: calls.append((name, split, download)) or fake,
  )
  data.source = 'tfds'
  data.tfds = dict(name='caltech_birds2011', data_dir='/nowhere')
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


def test_tfds_needs_name(data):
  data.source = 'tfds'
  with pytest.raises(ValueError, match='tfds.name'):
    loaders.make_eval_loader(data, 'test', batch_size=4)


# ----------------------------------------------------------------------------- make_metadata


def test_make_metadata_image_folder(tmp_path, capsys):
  folder = tmp_path / 'ILSVRC' / 'train'
  for wnid, n in [('n02', 2), ('n01', 3)]:
    (folder / wnid).mkdir(parents=True)
    for k in range(n):
      Image.new('RGB', (8, 8)).save(folder / wnid / f'{wnid}_{k}.JPEG')
  (folder / 'n01' / 'notes.txt').write_text('not an image')
  make_metadata.main(
    [
      '--image_folder',
      str(folder),
      '--out',
      str(tmp_path / 'meta'),
      '--dataset_name',
      'ILSVRC',
      '--split',
      'train',
    ]
  )
  assert 'wrote 5 images of 2 classes' in capsys.readouterr().out
  m = load_metadata(str(tmp_path / 'meta'), 'ILSVRC', 'train')
  assert m.image_ids[0] == 'train/n01/n01_0.JPEG' and m.labels['train/n01/n01_0.JPEG'] == 0
  assert m.labels['train/n02/n02_1.JPEG'] == 1 and len(m) == 5
  with pytest.raises(FileNotFoundError):
    make_metadata.scan_image_folder(str(tmp_path / 'nope'))
