"""SYNTH: a small, learnable WSOL benchmark generated on the fly (real JPEGs + PNG masks).

Each image holds one object of class k on a cluttered background: shape k (disc, square,
triangle, cross, ring, star, diamond, hexagon, crescent, bar), texture k (stripes, dots,
checker, ...) in colours of hue k, at a random position, rotation and scale (20-60% of the
shorter side). Clutter: a smooth random colour field, pixel noise, random strokes and plain
untextured blobs, none of them a class object. Image sizes vary around ``image_size`` so the
box rescaling rule is exercised like on real data.

Layout (wsolevaluation, dataset name ``SYNTH``; ids relative to ``out``, the data root):
  out/images/<split>/NNNNN.jpg
  out/masks/<split>/NNNNN.png, NNNNN_ignore.png          (val, test)
  out/metadata/SYNTH/<split>/image_ids.txt, class_labels.txt, image_sizes.txt,
      localization.txt (boxes ``path,x0,y0,x1,y1``, inclusive pixel coordinates),
      localization_mask.txt (val, test; ``path,mask_path,ignore_path``)
  out/synthetic.json (parameters, class names), out/.complete (written last)

A set is generated into a temporary folder next to ``out`` and renamed into place, so ``out``
never holds a half-written set; :func:`ensure_synthetic` refuses a folder holding anything but
a complete generated set (any file, at any depth, that the generator did not write is named),
so it never deletes files it did not write, nor any folder this run did not create.

The ignore mask is a 1-pixel band around the object outline (JPEG blurs the edge), so PxAP
ignores the ambiguous boundary the way OpenImages ignores ambiguous instances.

CLI: ``python -m dualsig_jax.data.synthetic --out DIR [--seed 0 --num_classes 10
--image_size 112 --num_train 3000 --num_val 300 --num_test 600 --preset default|tiny]``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import sys
import time

import cv2
import numpy as np

from dualsig_jax import vocab
from dualsig_jax.data.paths import SHIPPED_NAMES
from dualsig_jax.data.synthetic_render import (  # noqa: F401  (SHAPES, TEXTURES: public API)
  MAX_CLASSES,
  SHAPES,
  TEXTURES,
  class_names,
  ignore_band,
  render,
)

log = logging.getLogger(__name__)

DEFAULTS = dict(vocab.SYNTHETIC)
PRESETS = {
  'default': DEFAULTS,
  'tiny': dict(num_classes=10, image_size=64, num_train=200, num_val=40, num_test=80, seed=0),
}
SPLITS = ('train', 'val', 'test')
_MARKER = '.complete'


def _make_one(args):
  """Worker: render + write one image (and masks); returns its metadata fields."""
  out, split, idx, label, num_classes, image_size, seed, with_masks = args
  rng = np.random.default_rng([seed, SPLITS.index(split), idx])
  img, mask = render(label, num_classes, image_size, rng)
  image_id = f'images/{split}/{idx:05d}.jpg'
  cv2.imwrite(os.path.join(out, image_id), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
  ys, xs = np.nonzero(mask)
  rec = {
    'id': image_id,
    'label': label,
    'w': img.shape[1],
    'h': img.shape[0],
    'box': (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())),
  }
  if with_masks:
    rec['mask'] = f'masks/{split}/{idx:05d}.png'
    rec['ignore'] = f'masks/{split}/{idx:05d}_ignore.png'
    cv2.imwrite(os.path.join(out, rec['mask']), mask.astype(np.uint8) * 255)
    cv2.imwrite(os.path.join(out, rec['ignore']), ignore_band(mask).astype(np.uint8) * 255)
  return rec


def _write_metadata(out, split, recs, with_masks):
  d = os.path.join(out, 'metadata', 'SYNTH', split)
  os.makedirs(d, exist_ok=True)

  def write(name, lines):
    with open(os.path.join(d, name), 'w') as f:
      f.write(''.join(line + '\n' for line in lines))

  write('image_ids.txt', [r['id'] for r in recs])
  write('class_labels.txt', [f'{r["id"]},{r["label"]}' for r in recs])
  write('image_sizes.txt', [f'{r["id"]},{r["w"]},{r["h"]}' for r in recs])
  write('localization.txt', [f'{r["id"]},{",".join(map(str, r["box"]))}' for r in recs])
  if with_masks:
    write('localization_mask.txt', [f'{r["id"]},{r["mask"]},{r["ignore"]}' for r in recs])


def _pool(workers):
  # fork is fastest, but forking a process that already runs JAX threads can deadlock;
  # spawn re-imports only numpy/cv2 here.
  ctx = 'spawn' if 'jax' in sys.modules else 'fork'
  return multiprocessing.get_context(ctx).Pool(workers)


def generate(
  out_dir: str,
  *,
  num_classes: int = vocab.SYNTHETIC['num_classes'],
  image_size: int = vocab.SYNTHETIC['image_size'],
  num_train: int = vocab.SYNTHETIC['num_train'],
  num_val: int = vocab.SYNTHETIC['num_val'],
  num_test: int = vocab.SYNTHETIC['num_test'],
  seed: int = vocab.SYNTHETIC['seed'],
  workers: int | None = None,
) -> dict:
  """Writes the SYNTH benchmark into ``out_dir`` (see module docstring); returns its params.

  Deterministic: the same arguments give byte-identical files, for any ``workers``.
  """
  if not 2 <= num_classes <= MAX_CLASSES:
    raise ValueError(f'num_classes must be in [2, {MAX_CLASSES}], got {num_classes}')
  if image_size < 32:
    raise ValueError(f'image_size must be >= 32, got {image_size}')
  params = dict(
    num_classes=int(num_classes),
    image_size=int(image_size),
    num_train=int(num_train),
    num_val=int(num_val),
    num_test=int(num_test),
    seed=int(seed),
  )
  jobs, counts = [], {'train': num_train, 'val': num_val, 'test': num_test}
  for split in SPLITS:
    os.makedirs(os.path.join(out_dir, 'images', split), exist_ok=True)
    if split != 'train':
      os.makedirs(os.path.join(out_dir, 'masks', split), exist_ok=True)
    # Balanced classes in a seeded random order.
    labels = np.random.default_rng([seed, SPLITS.index(split), 10**6]).permutation(
      np.arange(counts[split]) % num_classes
    )
    jobs += [
      (out_dir, split, i, int(labels[i]), num_classes, image_size, seed, split != 'train')
      for i in range(counts[split])
    ]
  workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
  if workers > 1 and len(jobs) > 64:
    with _pool(workers) as pool:
      recs = pool.map(_make_one, jobs, chunksize=64)
  else:
    recs = [_make_one(j) for j in jobs]
  start = 0
  for split in SPLITS:
    _write_metadata(out_dir, split, recs[start : start + counts[split]], split != 'train')
    start += counts[split]
  with open(os.path.join(out_dir, 'synthetic.json'), 'w') as f:
    json.dump({'params': params, 'class_names': class_names(num_classes)}, f, indent=1)
  return params


# Top-level entries a generated set may hold besides its files ('.lock': earlier versions'
# empty flock file; a non-empty or non-file '.lock' is a user's and refuses regeneration).
_LEGACY = ('.lock',)
_META_FILES = ('image_ids.txt', 'class_labels.txt', 'image_sizes.txt', 'localization.txt')


def _split_files(params: dict) -> dict:
  """{split: (image ids, metadata file names)} of a set generated with ``params``."""
  out = {}
  for split in SPLITS:
    ids = [f'{i:05d}' for i in range(int(params[f'num_{split}']))]
    names = _META_FILES + (() if split == 'train' else ('localization_mask.txt',))
    out[split] = (ids, names)
  return out


def _written_metadata(params: dict) -> set:
  """Paths (files and folders, relative to a ``SYNTH`` metadata folder) the generator writes."""
  out = {_MARKER}
  for split, (_, names) in _split_files(params).items():
    out |= {split} | {f'{split}/{n}' for n in names}
  return out


def _written_set(params: dict) -> set:
  """Paths (files and folders, relative to the data root) that ``generate`` writes."""
  out = {'synthetic.json', _MARKER, 'images', 'masks', 'metadata', 'metadata/SYNTH'}
  out |= {f'metadata/SYNTH/{p}' for p in _written_metadata(params) if p != _MARKER}
  for split, (ids, _) in _split_files(params).items():
    out |= {f'images/{split}'} | {f'images/{split}/{i}.jpg' for i in ids}
    if split != 'train':
      out |= {f'masks/{split}'}
      out |= {f'masks/{split}/{i}{s}.png' for i in ids for s in ('', '_ignore')}
  return out


def synth_metadata_root(data_root: str, metadata_root: str | None) -> str:
  """Where the loaders read SYNTH metadata: ``data_root/metadata``, unless ``metadata_root``
  names another folder (``''`` / ``'metadata'`` mean the shipped set, which has no SYNTH)."""
  if metadata_root is None or metadata_root in SHIPPED_NAMES:
    return os.path.join(data_root, 'metadata')
  return metadata_root


def _marker(folder):
  """The parameters in ``folder``'s completion marker, or None."""
  try:
    with open(os.path.join(folder, _MARKER)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _is_complete(out_dir, params):
  return _marker(out_dir) == params


def _foreign(folder, written):
  """Paths under ``folder`` that the generator did not write: every entry without a marker,
  else every file or folder (at any depth) outside ``written(marker params)``."""
  params = _marker(folder)
  entries = sorted(os.listdir(folder))
  try:
    expected = set(written(params)) | set(_LEGACY) if params is not None else None
  except (KeyError, TypeError, ValueError):  # a marker of another format: trust nothing
    expected = None
  if expected is None:
    return entries
  found = []
  for dirpath, dirs, files in os.walk(folder):
    rel = os.path.relpath(dirpath, folder)
    for e in sorted(dirs) + sorted(files):
      found.append(e if rel == '.' else f'{rel}/{e}')
  # Earlier versions' '.lock' was an empty flock file: one with content is a user's file.
  legacy = {p for p in _LEGACY if os.path.isfile(os.path.join(folder, p))}
  legacy = {p for p in legacy if os.path.getsize(os.path.join(folder, p)) == 0}
  return sorted(p for p in found if p not in expected - (set(_LEGACY) - legacy))


def _refuse(folder, foreign, what):
  listed = ', '.join(foreign[:5]) + (' ...' if len(foreign) > 5 else '')
  raise FileExistsError(
    f'{what} {folder!r} holds files that are not a complete generated SYNTH set ({listed}); '
    'the generator only writes into a new or empty folder, or replaces a set it generated '
    '(one with a .complete marker and only the files it wrote), and never deletes anything '
    'else: move those files out, or point it '
    'at a new folder, or set --config.input.synthetic.generate=False to use the images and '
    'metadata that are there.'
  )


@contextlib.contextmanager
def _locked(path):
  """Serializes generation into ``path`` between processes (e.g. parallel tests, hosts).

  The lock is on the parent folder, so no lock file is left behind."""
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  fd = os.open(parent, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _new_folder(parent, prefix):
  """A new folder ``parent/prefix<pid>-<random>`` made with the umask's mode (mkdtemp's 0700
  would survive the rename and hide the set from other users)."""
  while True:
    path = os.path.join(parent, f'{prefix}{os.getpid()}-{secrets.token_hex(4)}')
    try:
      os.mkdir(path)
      return path
    except FileExistsError:
      continue


def _put_in_place(tmp, target):
  """Moves the finished folder ``tmp`` to ``target`` (absent, empty, or a generated set whose
  every file the generator wrote, checked by the caller).

  A new target is one rename. An existing one keeps its inode (it may be a mount point or the
  target of a link): its entries are moved aside into a folder this call creates, ``tmp``'s
  moved in with the completion marker last, then that folder is deleted.
  """
  if not os.path.lexists(target):
    os.rename(tmp, target)
    return
  parent, name = os.path.split(target)
  old = _new_folder(parent, f'.{name}.old-')
  for e in os.listdir(target):
    shutil.move(os.path.join(target, e), os.path.join(old, e))
  for e in sorted(os.listdir(tmp), key=lambda e: e == _MARKER):
    shutil.move(os.path.join(tmp, e), os.path.join(target, e))
  os.rmdir(tmp)
  shutil.rmtree(old)


def _fill(target, params, write, written, what):
  """Makes ``target`` hold ``write(tmp)``'s output and the marker of ``params``.

  ``write`` fills a temporary folder next to ``target``; on any error (or interrupt) that folder
  is removed and ``target`` is untouched. ``written(params)``: the relative paths a set of
  ``params`` holds (anything else in ``target`` is refused, never deleted). Returns False when
  ``target`` was already complete.
  """
  target = os.path.realpath(target)
  parent, name = os.path.split(target)
  with _locked(target):
    if _is_complete(target, params):
      return False
    if os.path.lexists(target):
      if not os.path.isdir(target):
        raise FileExistsError(f'{what} {target!r} exists and is not a folder')
      foreign = _foreign(target, written)
      if foreign:
        _refuse(target, foreign, what)
    # A run killed outright leaves its temporary folder; only this run's own folders are ever
    # deleted (a sibling may be the user's, whatever its name), so leftovers are only named.
    stale = [
      e for e in os.listdir(parent) if e.startswith((f'.{name}.generating-', f'.{name}.old-'))
    ]
    if stale:
      log.warning(
        'folders next to %s look like leftovers of an interrupted generation (kept; remove '
        'them if they are not yours): %s',
        target,
        ', '.join(sorted(stale)),
      )
    tmp = _new_folder(parent, f'.{name}.generating-')
    try:
      write(tmp)
      with open(os.path.join(tmp, _MARKER), 'w') as f:
        json.dump(params, f)
      _put_in_place(tmp, target)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return True


def ensure_synthetic(input_cfg, *, workers: int | None = None) -> str:
  """Generates SYNTH into ``input_cfg.data_root`` unless a complete copy is already there.

  Parameters come from ``input_cfg.synthetic`` (num_classes, image_size, num_train, num_val,
  num_test, seed). Idempotent. The set is written into a temporary folder next to the data
  root and moved into place with its completion marker last, so an interrupted run leaves
  nothing half-written. A data root holding anything but a complete generated set (e.g. the
  user's own images) is refused with ``FileExistsError`` and left as it is; a generated set with
  other parameters is replaced. If ``input_cfg.metadata_root`` names another folder, the SYNTH
  metadata is copied to ``<metadata_root>/SYNTH`` the same way. Returns the data root.
  """
  syn = input_cfg['synthetic']
  params = {k: int(syn[k]) if k in syn else DEFAULTS[k] for k in DEFAULTS}
  out = input_cfg['data_root']
  if not out:
    raise ValueError('input.data_root must name the folder for the synthetic benchmark')
  if _fill(
    out, params, lambda d: generate(d, workers=workers, **params), _written_set, 'data root'
  ):
    log.info('generated the SYNTH benchmark in %s (%s)', out, params)
  meta_root = synth_metadata_root(out, input_cfg.get('metadata_root', ''))
  src = os.path.join(os.path.realpath(out), 'metadata', 'SYNTH')
  dst = os.path.join(meta_root, 'SYNTH')
  if os.path.realpath(dst) != src:
    copy = lambda d: shutil.copytree(src, d, dirs_exist_ok=True)
    _fill(dst, params, copy, _written_metadata, 'SYNTH metadata copy')
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--preset', default='default', choices=sorted(PRESETS))
  for k in DEFAULTS:
    parser.add_argument(f'--{k}', type=int, default=None)
  parser.add_argument('--workers', type=int, default=None)
  args = parser.parse_args(argv)
  params = dict(PRESETS[args.preset])
  params.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None})
  t0 = time.time()
  try:
    done = _fill(
      args.out, params, lambda d: generate(d, workers=args.workers, **params), _written_set, '--out'
    )
  except FileExistsError as e:
    raise SystemExit(str(e)) from None
  n = params['num_train'] + params['num_val'] + params['num_test']
  if done:
    print(f'wrote {n} images to {args.out} in {time.time() - t0:.1f}s ({params})')
  else:
    print(f'{args.out} already holds the complete set ({params})')


if __name__ == '__main__':
  main()
