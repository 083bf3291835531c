"""Folder-source loaders: bad images, symlinked folders, the CARS split layout, eval batches
(padding, boxes, masks, sharding) and train batches (determinism, workers, sharding, resume)."""

import gc
import os
import shutil

import cv2
import data_helpers
import numpy as np
import pytest
from data_helpers import image_path, input_config, train_loader
from PIL import Image

from dualsig_jax.data import loaders, splits, transforms
from dualsig_jax.data import train_loader as train_loader_lib
from dualsig_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BadImageError

# Fixtures shared with the other data tests (bound here so pytest finds them).
synth_dir, data = data_helpers.synth_dir, data_helpers.data

# ----------------------------------------------------------------------------- bad images


def test_missing_image_names_file_and_line(data):
  os.remove(image_path(data, 'test', 3))
  with pytest.raises(BadImageError, match='not found') as e:
    list(loaders.make_eval_loader(data, 'test', batch_size=8))
  assert 'images/test/00003.jpg' in str(e.value) and 'image_ids.txt:4' in str(e.value)


@pytest.mark.parametrize('how', ['truncated', 'garbage'])
def test_corrupt_image_names_file_and_line(data, how):
  path = image_path(data, 'train', 0)
  with open(path, 'rb') as f:
    raw = f.read()
  with open(path, 'wb') as f:
    f.write(raw[: len(raw) // 2] if how == 'truncated' else b'not a jpeg at all' * 10)
  with pytest.raises(BadImageError, match='cannot decode') as e:
    for _ in train_loader(data):
      pass
  assert 'images/train/00000.jpg' in str(e.value) and 'image_ids.txt:1' in str(e.value)


def test_gray_cmyk_rgba_converted(data):
  rgb = {}
  for k, mode in [(0, 'L'), (1, 'CMYK'), (2, 'RGBA'), (3, 'P')]:
    path = image_path(data, 'test', k)
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
  os.remove(image_path(data, 'train', 5))
  with open(image_path(data, 'train', 9), 'wb') as f:
    f.write(b'garbage')
  data.skip_bad_images = True
  data.augment = False  # metadata order, so the slots of the bad images are known
  loader = train_loader(data, batch_size=10)
  labels = np.concatenate([b['label'] for b in loader])
  # Full batches: the slot of a bad image gets the next readable image of the epoch's order
  # (the same whichever process reads it).
  meta = splits.load_split(data, 'train')
  want = [meta.labels[meta.image_ids[k + (k in (5, 9))]] for k in range(200)]
  np.testing.assert_array_equal(labels, want)
  assert loader.skip_report.count() == 2
  ids = [e[0] for e in loader.skip_report.entries()]
  assert ids == ['images/train/00005.jpg', 'images/train/00009.jpg']
  assert 'image_ids.txt:6' in loader.skip_report.entries()[0][1]
  assert 'skipped 2' in loader.skip_report.summary()
  os.remove(image_path(data, 'test', 5))
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
  a = list(train_loader(data, seed=3))
  b = list(train_loader(data, seed=3))
  c = list(train_loader(data, seed=4))
  assert len(a) == 200 // 16 and a[0]['image'].shape == (16, 64, 64, 3)
  assert a[0]['image'].dtype == np.float32 and a[0]['label'].dtype == np.int32
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert not np.array_equal(a[0]['label'], c[0]['label'])
  assert loaders.steps_per_epoch(data, 16) == 12


def test_no_augment_gives_metadata_order_and_centre_crops(data):
  """input.augment=False: the split in metadata order, centre crop, no flip, whatever the seed
  (the parity tests against the PyTorch reference loop need exactly this)."""
  cfg = input_config(data.data_root, augment=False)
  a = list(train_loader(cfg, seed=3))
  b = list(train_loader(cfg, seed=4))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
  meta = splits.load_split(cfg, 'train')
  labels = np.concatenate([x['label'] for x in a])
  want_labels = [meta.labels[i] for i in meta.image_ids[: len(labels)]]
  np.testing.assert_array_equal(labels, np.asarray(want_labels, np.int32))
  img = transforms.load_rgb(os.path.join(cfg.data_root, meta.image_ids[1]))
  want = transforms.normalize(np.asarray(img.resize((72, 72), Image.BILINEAR))[4:68, 4:68])
  np.testing.assert_allclose(a[0]['image'][1], want, atol=1e-6)


def test_train_batch_normalization_matches_per_image_transform(data):
  # The loader crops uint8 per image and normalizes once per batch (less copying); the
  # values must be exactly those of the per-image float transform on the same records and
  # generators: epoch order train_order(seed, epoch), crop/flip from augment_rng(seed, e, pos).
  source, _ = splits.build_source(data, 'train', train=True)
  order = train_loader_lib.train_order(5, 0, len(source))
  got = list(train_loader(data, seed=5))
  assert len(got) == 200 // 16
  for k, batch in enumerate(got):
    assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
    for row in range(16):
      pos = k * 16 + row
      rec = source[int(order[pos])]
      want = transforms.train_transform(
        rec['image'], train_loader_lib.augment_rng(5, 0, pos), 72, 64
      )
      np.testing.assert_array_equal(batch['image'][row], want)
      assert batch['label'][row] == rec['label']
  crops = [np.random.default_rng(i).integers(0, 256, (5, 7, 3), dtype=np.uint8) for i in range(3)]
  np.testing.assert_array_equal(
    transforms.normalize_batch(crops), np.stack([transforms.normalize(c) for c in crops])
  )


def _same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def test_train_worker_processes_match_in_process(data):
  # Batches are formed before the work is split over the workers: identical batches.
  ref = list(train_loader(data, seed=1, batch_size=20))
  data.num_workers = 2
  got = list(train_loader(data, seed=1, batch_size=20))
  assert len(ref) == 10
  _same_batches(got, ref)


def _global(cfg, processes, global_batch, **kw):
  """Global batches assembled from the per-process loaders (rows p*B..(p+1)*B of each)."""
  per = [
    list(
      train_loader(
        cfg,
        process_index=p,
        process_count=processes,
        batch_size=global_batch // processes,
        **kw,
      )
    )
    for p in range(processes)
  ]
  return [
    {k: np.concatenate([per[p][i][k] for p in range(processes)]) for k in ('image', 'label')}
    for i in range(len(per[0]))
  ]


def test_global_batches_do_not_depend_on_the_process_count(data):
  """The global batch sequence (order, crops, flips) is a function of the seed and the epoch
  only: 1, 2 and 4 processes (one with worker processes) give the same batches, across an
  epoch boundary (200 images, 24 per global batch: 8 per epoch, 8 dropped)."""
  ref = _global(data, 1, 24, seed=7, num_epochs=2)
  assert len(ref) == 16
  _same_batches(_global(data, 2, 24, seed=7, num_epochs=2), ref)
  data.num_workers = 2
  _same_batches(_global(data, 4, 24, seed=7, num_epochs=2), ref)
  # Epochs differ in order and augmentation; within an epoch every image appears once.
  labels = [b['label'] for b in ref]
  assert not np.array_equal(np.concatenate(labels[:8]), np.concatenate(labels[8:]))
  order = train_loader_lib.train_order(7, 0, 200)
  assert len(set(order[: 8 * 24].tolist())) == 8 * 24


def test_train_state_resumes_on_another_process_count(data):
  """A position saved by 2 processes with 2 workers each continues the same global sequence
  in 1 process without workers (input.num_workers is resume-safe)."""
  one = iter(train_loader(data, seed=2, num_epochs=None))
  want = [next(one) for _ in range(15)]  # 12 per epoch: crosses into epoch 1
  data.num_workers = 2
  two = [
    iter(
      train_loader(data, seed=2, num_epochs=None, process_index=p, process_count=2, batch_size=8)
    )
    for p in range(2)
  ]
  for _ in range(5):
    for it in two:
      next(it)
  states = [it.get_state() for it in two]
  for it in two:
    it.close()
  data.num_workers = 0
  assert states[0] == states[1]  # no process index in it: any process count can read it
  resumed = iter(train_loader(data, seed=2, num_epochs=None))
  resumed.set_state(states[0])
  _same_batches([next(resumed) for _ in range(10)], want[5:])


def test_train_state_refuses_another_sequence(data):
  it = iter(train_loader(data, seed=2, num_epochs=None))
  next(it)
  state = it.get_state()
  with pytest.raises(ValueError, match='global_batch_size=16, this run has 32'):
    iter(train_loader(data, seed=2, num_epochs=None, batch_size=32)).set_state(state)
  with pytest.raises(ValueError, match='seed=2, this run has 3'):
    iter(train_loader(data, seed=3, num_epochs=None)).set_state(state)
  old = b'{"version": 2, "last_seen_indices": {"0": 31}, "last_worker_index": 0}'
  with pytest.raises(ValueError, match='previous train loader'):
    iter(train_loader(data, seed=2, num_epochs=None)).set_state(old)


def test_a_checkpoint_of_the_previous_loader_resumes_at_its_step(data, tmp_path, caplog):
  """grain DataLoader states (before the global order) resume at the checkpoint's step."""
  fresh = iter(train_loader(data, seed=2, num_epochs=None))
  want = [next(fresh) for _ in range(6)]
  folder = tmp_path / 'data'
  folder.mkdir()
  (folder / 'process_0-of-2.json').write_text('{"version": 2, "last_seen_indices": {"0": 9}}')
  it = iter(train_loader(data, seed=2, num_epochs=None))
  with pytest.raises(ValueError, match='previous train loader'):
    it.load_state_dir(str(folder))
  with caplog.at_level('WARNING', logger='dualsig_jax'):
    it.load_state_dir(str(folder), step=5)
  assert 'continuing at global batch 5' in caplog.text
  np.testing.assert_array_equal(next(it)['image'], want[5]['image'])


def test_train_split_smaller_than_a_global_batch_is_refused(data):
  with pytest.raises(ValueError, match='200 images, fewer than one global batch of 256'):
    train_loader(data, batch_size=128, process_count=2)


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
      for batch in train_loader(data, process_index=p, process_count=2, batch_size=10)
      for img in batch['image']
    ]
    assert len(got) == len(set(got)) == 100
    shards.append(set(got))
  assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 200


def test_train_iterator_state_restore(data, tmp_path):
  it = iter(train_loader(data, num_epochs=None))
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  it2 = iter(train_loader(data, num_epochs=None))
  it2.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(it2)['image'], w['image'])
  # Through grain's orbax handler, as the checkpoints save it.
  import grain.python as grain
  import orbax.checkpoint as ocp

  it3 = iter(train_loader(data, num_epochs=None))
  for _ in range(3):
    next(it3)
  ckpt = ocp.Checkpointer(grain.PyGrainCheckpointHandler())
  ckpt.save(str(tmp_path / 'it'), it3)
  it4 = iter(train_loader(data, num_epochs=None))
  ckpt.restore(str(tmp_path / 'it'), it4)
  np.testing.assert_array_equal(next(it4)['image'], want[0]['image'])
  it5 = iter(train_loader(data, num_epochs=None))
  it5.load_state_dir(str(tmp_path / 'it'))  # what checkpoints.restore calls
  np.testing.assert_array_equal(next(it5)['image'], want[0]['image'])


def test_unknown_source_rejected(data):
  data.source = 'webdataset'
  with pytest.raises(ValueError, match="valid: \\['folder', 'tfds'\\]"):
    train_loader(data)


def test_bad_image_error_says_how_to_skip(data):
  os.remove(image_path(data, 'train', 4))
  with pytest.raises(BadImageError, match='not found') as e:
    for _ in train_loader(data):
      pass
  assert '--config.input.skip_bad_images=True' in str(e.value)


def test_skip_report_folder_removed_with_the_loader(data):
  os.remove(image_path(data, 'train', 5))
  data.skip_bad_images = True
  data.num_workers = 2  # Skips recorded by worker processes, which must not remove the folder.
  loader = train_loader(data, batch_size=10)
  # The skipped slot is filled with the next image of the epoch's order: full batches.
  assert sum(len(b['label']) for b in loader) == 200
  log_dir = loader.skip_report.log_dir
  assert os.path.basename(log_dir).startswith('dualsig_skipped_')
  assert loader.skip_report.count() == 1 and os.path.isdir(log_dir)
  del loader
  gc.collect()
  assert not os.path.exists(log_dir)


# ----------------------------------------------------------------------------- symlinks


def test_symlinked_folders_under_the_root_are_followed(data, tmp_path):
  """A data root assembled from symlinks (e.g. images/ on another disk) reads the same."""
  want = next(iter(loaders.make_eval_loader(data, 'test', batch_size=8)))
  for sub in ('images/test', 'masks'):
    target = tmp_path / 'other_disk' / sub
    shutil.move(os.path.join(data.data_root, sub), target)
    os.symlink(target, os.path.join(data.data_root, sub))
  got = next(iter(loaders.make_eval_loader(data, 'test', batch_size=8)))
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_symlinked_data_root_is_followed(data, tmp_path):
  link = tmp_path / 'link'
  os.symlink(data.data_root, link)
  data.data_root = str(link)
  assert len(list(loaders.make_eval_loader(data, 'test', batch_size=40))) == 2


# ----------------------------------------------------------------------------- CARS layout


def _cars(tmp_path, prefix=('', '')):
  """A CARS-like metadata root whose splits share ids (00001.jpg ...), as the real one, unless
  ``prefix`` (train, test) makes them differ."""
  meta = tmp_path / 'meta'
  for split, pre in zip(('train', 'test'), prefix):
    d = meta / 'CARS' / split
    d.mkdir(parents=True)
    ids = [f'{pre}{k:05d}.jpg' for k in range(1, 4)]
    (d / 'image_ids.txt').write_text(''.join(f'{i}\n' for i in ids))
    (d / 'class_labels.txt').write_text(''.join(f'{i},{k}\n' for k, i in enumerate(ids)))
    (d / 'image_sizes.txt').write_text(''.join(f'{i},20,10\n' for i in ids))
    (d / 'localization.txt').write_text(''.join(f'{i},1,1,19,9\n' for i in ids))
  return input_config(
    str(tmp_path / 'cars'), dataset_name='CARS', metadata_root=str(meta), eval_size=16
  )


def _write_images(folder, value, prefix=''):
  os.makedirs(folder, exist_ok=True)
  for k in range(1, 4):
    img = Image.new('RGB', (20, 10), (value, value, value))
    img.save(os.path.join(folder, f'{prefix}{k:05d}.jpg'))


def test_cars_split_folders(tmp_path):
  cfg = _cars(tmp_path)
  _write_images(os.path.join(cfg.data_root, 'cars_train'), 0)
  _write_images(os.path.join(cfg.data_root, 'cars_test'), 255)
  means = {}
  for split in ('train', 'test'):
    (b,) = list(loaders.make_eval_loader(cfg, split, batch_size=3))
    means[split] = float((b['image'] * IMAGENET_STD + IMAGENET_MEAN).mean())
  assert means['train'] < 0.05 and means['test'] > 0.95


def test_cars_flat_root_with_overlapping_ids_refused(tmp_path):
  cfg = _cars(tmp_path)
  _write_images(cfg.data_root, 0)
  with pytest.raises(ValueError, match='cars_test') as e:
    loaders.make_eval_loader(cfg, 'test', batch_size=3)
  assert '00001.jpg' in str(e.value) and "'train'" in str(e.value)
  with pytest.raises(ValueError, match='cars_train'):
    loaders.steps_per_epoch(cfg, 3)


def test_cars_flat_root_without_shared_ids_accepted(tmp_path):
  cfg = _cars(tmp_path, prefix=('train_', ''))
  _write_images(cfg.data_root, 0, 'train_')
  _write_images(cfg.data_root, 255)
  assert len(list(loaders.make_eval_loader(cfg, 'test', batch_size=3))) == 1
  assert loaders.steps_per_epoch(cfg, 3) == 1
