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

The ignore mask is a 1-pixel band around the object outline (JPEG blurs the edge), so PxAP
ignores the ambiguous boundary the way OpenImages ignores ambiguous instances.

CLI: ``python -m dualsig_jax.data.synthetic --out DIR [--seed 0 --num_classes 10
--image_size 112 --num_train 3000 --num_val 500 --num_test 1000 --preset default|tiny]``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import multiprocessing
import os
import shutil
import sys
import time

import cv2
import numpy as np

SHAPES = (
  'disc',
  'square',
  'triangle',
  'cross',
  'ring',
  'star',
  'diamond',
  'hexagon',
  'crescent',
  'bar',
)
TEXTURES = (
  'hstripes',
  'vstripes',
  'dstripes',
  'adstripes',
  'dots',
  'checker',
  'solid',
  'rings',
  'grid',
  'sectors',
)
MAX_CLASSES = len(SHAPES)
DEFAULTS = dict(num_classes=10, image_size=112, num_train=3000, num_val=500, num_test=1000, seed=0)
PRESETS = {
  'default': DEFAULTS,
  'tiny': dict(num_classes=10, image_size=64, num_train=200, num_val=40, num_test=80, seed=0),
}
SPLITS = ('train', 'val', 'test')
_MARKER = '.complete'


def class_names(num_classes: int) -> list[str]:
  """``'<shape>_<texture>'`` for each class."""
  return [f'{SHAPES[k]}_{TEXTURES[k]}' for k in range(num_classes)]


def _polygon(kind, s, rng):
  """Vertices (float [N, 2], object frame, unrotated) of polygonal shapes of size s."""
  r = s / 2
  if kind == 'square':
    a = r * 0.8
    return np.array([[-a, -a], [a, -a], [a, a], [-a, a]])
  if kind == 'triangle':
    t = np.deg2rad([-90, 30, 150])
    return np.stack([np.cos(t), np.sin(t)], 1) * r
  if kind == 'cross':
    a, b = r, r / 3
    return np.array(
      [
        [-b, -a],
        [b, -a],
        [b, -b],
        [a, -b],
        [a, b],
        [b, b],
        [b, a],
        [-b, a],
        [-b, b],
        [-a, b],
        [-a, -b],
        [-b, -b],
      ]
    )
  if kind == 'star':
    t = np.deg2rad(np.arange(10) * 36 - 90)
    rad = np.where(np.arange(10) % 2 == 0, r, r * 0.42)
    return np.stack([np.cos(t) * rad, np.sin(t) * rad], 1)
  if kind == 'diamond':
    return np.array([[0, -r], [r * 0.6, 0], [0, r], [-r * 0.6, 0]])
  if kind == 'hexagon':
    t = np.deg2rad(np.arange(6) * 60)
    return np.stack([np.cos(t), np.sin(t)], 1) * r
  raise ValueError(kind)


def _shape_mask(kind, h, w, cx, cy, s, angle):
  """bool [h, w] mask of one shape centred at (cx, cy), size s, rotated by angle (rad)."""
  m = np.zeros((h, w), np.uint8)
  c, sn = np.cos(angle), np.sin(angle)
  rot = np.array([[c, -sn], [sn, c]])
  shift = 4  # cv2 sub-pixel drawing: coordinates in 1/16 pixel.

  def pts(v):
    return np.round((v @ rot.T + [cx, cy]) * (1 << shift)).astype(np.int32)

  def ellipse(center, axes, value):
    cv2.ellipse(
      m,
      tuple(int(round(x * 16)) for x in center),
      tuple(int(round(x * 16)) for x in axes),
      np.rad2deg(angle),
      0,
      360,
      value,
      -1,
      cv2.LINE_8,
      shift,
    )

  r = s / 2
  if kind == 'disc':
    ellipse((cx, cy), (r, r), 1)
  elif kind == 'ring':
    ellipse((cx, cy), (r, r), 1)
    ellipse((cx, cy), (r * 0.5, r * 0.5), 0)
  elif kind == 'crescent':
    ellipse((cx, cy), (r, r), 1)
    off = np.array([r * 0.45, 0]) @ rot.T
    ellipse((cx + off[0], cy + off[1]), (r * 0.8, r * 0.8), 0)
  elif kind == 'bar':
    ellipse((cx, cy), (r, r * 0.32), 1)
  else:
    cv2.fillPoly(m, [pts(_polygon(kind, s, None))], 1, cv2.LINE_8, shift)
  return m.astype(bool)


def _texture(kind, h, w, cx, cy, angle, period):
  """float [h, w] in [0, 1]: the class texture, in the object's rotated frame."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  c, s = np.cos(angle), np.sin(angle)
  u = (x - cx) * c + (y - cy) * s
  v = -(x - cx) * s + (y - cy) * c
  p = period
  if kind == 'hstripes':
    t = (v % p) < p / 2
  elif kind == 'vstripes':
    t = (u % p) < p / 2
  elif kind == 'dstripes':
    t = ((u + v) % p) < p / 2
  elif kind == 'adstripes':
    t = ((u - v) % (p * 0.8)) < p * 0.25
  elif kind == 'dots':
    t = ((u % p - p / 2) ** 2 + (v % p - p / 2) ** 2) < (p * 0.3) ** 2
  elif kind == 'checker':
    t = ((u // (p / 2)) + (v // (p / 2))) % 2 == 0
  elif kind == 'solid':
    t = np.zeros((h, w), bool)
  elif kind == 'rings':
    t = (np.sqrt(u * u + v * v) % p) < p / 2
  elif kind == 'grid':
    t = ((u % p) < 1.6) | ((v % p) < 1.6)
  elif kind == 'sectors':
    t = (np.floor((np.arctan2(v, u) + np.pi) / (np.pi / 4)) % 2) == 0
  else:
    raise ValueError(kind)
  return t.astype(np.float32)


def _hsv(h, s, v):
  """HSV (h in degrees) -> RGB float [3] in [0, 255]."""
  px = np.uint8([[[int(h % 360) // 2, int(s * 255), int(v * 255)]]])
  return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def render(label: int, num_classes: int, image_size: int, rng: np.random.Generator):
  """One example -> (uint8 RGB [H, W, 3], bool mask [H, W]). Sizes vary ~0.85-1.2x."""
  h, w = (int(round(image_size * f)) for f in rng.uniform(0.85, 1.2, size=2))
  # Background: smooth random colour field + noise.
  low = rng.uniform(40, 215, size=(3, 3, 3)).astype(np.float32)
  img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
  # Plain blobs and strokes in random colours: clutter that is never a class object.
  for _ in range(rng.integers(1, 4)):
    axes = tuple(int(x) for x in rng.uniform(0.04, 0.12, 2) * min(h, w))
    cv2.ellipse(
      img,
      (int(rng.integers(0, w)), int(rng.integers(0, h))),
      axes,
      float(rng.uniform(0, 180)),
      0,
      360,
      rng.uniform(0, 255, 3).tolist(),
      -1,
    )
  for _ in range(rng.integers(4, 10)):
    n = int(rng.integers(2, 5))
    p = np.cumsum(rng.normal(0, 0.25 * min(h, w), size=(n, 2)), 0) + rng.uniform(0, 1, 2) * [w, h]
    cv2.polylines(
      img,
      [p.astype(np.int32)],
      False,
      rng.uniform(0, 255, 3).tolist(),
      int(rng.integers(1, 3)),
      cv2.LINE_AA,
    )
  # The object.
  s = rng.uniform(0.2, 0.6) * min(h, w)
  # A rotated square reaches 0.57 s from its centre; keep every shape inside the image.
  margin = min(0.57 * s, min(h, w) / 2 - 1)
  cx = rng.uniform(margin, w - margin)
  cy = rng.uniform(margin, h - margin)
  angle = rng.uniform(0, 2 * np.pi)
  mask = _shape_mask(SHAPES[label], h, w, cx, cy, s, angle)
  if not mask.any():  # Vanishingly rare (tiny objects); a 2x2 blob keeps the box valid.
    mask[int(cy) : int(cy) + 2, int(cx) : int(cx) + 2] = True
  hue = label * 360.0 / num_classes + rng.uniform(-8, 8)
  col_a = _hsv(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
  col_b = _hsv(hue + 20, rng.uniform(0.6, 0.9), rng.uniform(0.25, 0.45))
  period = max(4.0, s / rng.uniform(3.5, 5.5))
  tex = _texture(TEXTURES[label], h, w, cx, cy, angle, period)[..., None]
  obj = col_a * (1 - tex) + col_b * tex
  img = np.where(mask[..., None], obj, img)
  img += rng.normal(0, 8, size=img.shape).astype(np.float32)
  return np.clip(img, 0, 255).astype(np.uint8), mask


def _ignore_band(mask):
  k = np.ones((3, 3), np.uint8)
  m = mask.astype(np.uint8)
  return (cv2.dilate(m, k) > 0) & ~(cv2.erode(m, k) > 0)


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
    cv2.imwrite(os.path.join(out, rec['ignore']), _ignore_band(mask).astype(np.uint8) * 255)
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
  num_classes: int = 10,
  image_size: int = 112,
  num_train: int = 3000,
  num_val: int = 500,
  num_test: int = 1000,
  seed: int = 0,
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


def _is_complete(out_dir, params):
  try:
    with open(os.path.join(out_dir, _MARKER)) as f:
      return json.load(f) == params
  except (OSError, ValueError):
    return False


@contextlib.contextmanager
def _locked(out_dir):
  """Serializes generation between processes sharing ``out_dir`` (e.g. parallel tests)."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, '.lock'), 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def ensure_synthetic(input_cfg) -> str:
  """Generates SYNTH into ``input_cfg.data_root`` unless a complete copy is already there.

  Parameters come from ``input_cfg.synthetic`` (num_classes, image_size, num_train, num_val,
  num_test, seed). Idempotent; the completion marker is written last, so an interrupted run
  is redone. If ``input_cfg.metadata_root`` is set elsewhere, the metadata is copied there.
  Returns the data root.
  """
  syn = input_cfg['synthetic']
  params = {k: int(syn[k]) if k in syn else DEFAULTS[k] for k in DEFAULTS}
  out = input_cfg['data_root']
  if not out:
    raise ValueError('input.data_root must name the folder for the synthetic benchmark')
  with _locked(out):
    if not _is_complete(out, params):
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, _MARKER))
      for sub in ('images', 'masks', os.path.join('metadata', 'SYNTH')):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
      generate(out, **params)
      with open(os.path.join(out, _MARKER), 'w') as f:
        json.dump(params, f)
    meta_root = input_cfg.get('metadata_root') if hasattr(input_cfg, 'get') else None
    if meta_root and os.path.abspath(meta_root) != os.path.abspath(os.path.join(out, 'metadata')):
      dst = os.path.join(meta_root, 'SYNTH')
      shutil.rmtree(dst, ignore_errors=True)
      shutil.copytree(os.path.join(out, 'metadata', 'SYNTH'), dst)
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
  generate(args.out, workers=args.workers, **params)
  with open(os.path.join(args.out, _MARKER), 'w') as f:
    json.dump(params, f)
  n = params['num_train'] + params['num_val'] + params['num_test']
  print(f'wrote {n} images to {args.out} in {time.time() - t0:.1f}s ({params})')


if __name__ == '__main__':
  main()
