"""SYNTH rendering: one image of class k (shape k, texture k, hue k) on a cluttered background.

Used by :mod:`dualsig_jax.data.synthetic`, which writes the benchmark; see its docstring for the
dataset. Pure numpy + OpenCV, so generator worker processes import no JAX.
"""

from __future__ import annotations

import cv2
import numpy as np

from dualsig_jax import defaults

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
# The config schema checks input.synthetic.num_classes without importing cv2.
assert MAX_CLASSES == defaults.SYNTHETIC_MAX_CLASSES


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


def ignore_band(mask: np.ndarray) -> np.ndarray:
  """bool [H, W]: the 1-pixel band around the outline of a bool mask (the ignore region)."""
  k = np.ones((3, 3), np.uint8)
  m = mask.astype(np.uint8)
  return (cv2.dilate(m, k) > 0) & ~(cv2.erode(m, k) > 0)
