"""Image decoding and the reference's train/eval transforms, in numpy + PIL.

The reference (wsolevaluation) uses torchvision on PIL images:
  train: Resize((R, R)) -> RandomCrop(C) -> RandomHorizontalFlip -> ToTensor -> Normalize
  eval:  Resize((S, S)) -> ToTensor -> Normalize
torchvision's Resize on a PIL image is ``PIL.Image.resize(..., BILINEAR)`` (PIL antialiases
when shrinking), so we call PIL directly to get the same pixels; crop and flip are done on the
uint8 image before the float conversion because that is cheaper and exact.
"""

from __future__ import annotations

import functools
import warnings

import cv2
import numpy as np
from PIL import Image

from dualsig_jax import vocab

IMAGENET_MEAN = np.array(vocab.IMAGENET_MEAN, dtype=np.float32)
IMAGENET_STD = np.array(vocab.IMAGENET_STD, dtype=np.float32)
# (x / 255 - mean) / std == x * _SCALE - _OFFSET (one multiply-add instead of three ops).
_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_OFFSET = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)


class BadImageError(RuntimeError):
  """An image or mask file is missing or cannot be decoded (message names file and line)."""


# Appended by the sources when a bad image stops a run (skipping is a training-only option).
SKIP_HINT = (
  '. To skip unreadable training images instead, set --config.input.skip_bad_images=True '
  '(evaluation never skips).'
)


def load_rgb(path: str, where: str = '') -> Image.Image:
  """Decodes ``path`` into an RGB PIL image (grayscale, CMYK, RGBA, palette converted).

  Raises:
    BadImageError naming the file and ``where`` (the metadata line) if missing or corrupt.
  """
  ctx = f' (listed at {where})' if where else ''
  try:
    with warnings.catch_warnings():
      # PIL warns (not raises) on some broken EXIF blocks; the pixels are still fine.
      warnings.simplefilter('ignore')
      img = Image.open(path)
      img.load()  # Force a full decode so truncated files fail here, not later.
      # load() has read everything and closed the file (single-frame formats).
      return img.convert('RGB') if img.mode != 'RGB' else img
  except FileNotFoundError:
    raise BadImageError(f'image file not found: {path}{ctx}') from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise BadImageError(f'cannot decode image {path}{ctx}: {type(e).__name__}: {e}') from None


@functools.lru_cache(maxsize=16)
def _row_constants(width: int):
  return np.tile(_SCALE, width), np.tile(_OFFSET, width)


def normalize(arr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """uint8 ``[H, W, 3]`` -> float32 ``[H, W, 3]`` normalized with ImageNet mean/std.

  ``out`` (float32 ``[H, W, 3]``, C-contiguous, optional) receives the result in place, so a
  batch can be written straight into its (shared-memory) output buffer without a float
  temporary per image; the values are the same either way.
  """
  h, w, c = arr.shape
  # Broadcasting a length-3 vector makes numpy loop 3 elements at a time (~5x slower);
  # viewing rows as [W*3] with tiled constants gives long vectorized inner loops.
  scale, offset = _row_constants(w)
  if out is None:
    out = np.empty((h, w, c), np.float32)
  rows = out.reshape(h, w * c)  # A view (out is contiguous), so writes land in ``out``.
  np.multiply(arr.reshape(h, w * c), scale, out=rows, dtype=np.float32)
  rows -= offset
  return out


def normalize_batch(images, out: np.ndarray | None = None) -> np.ndarray:
  """Sequence of B uint8 ``[H, W, 3]`` -> float32 ``[B, H, W, 3]``, ImageNet-normalized.

  Image by image (each image's rows stay in cache between the multiply and the subtract,
  unlike two passes over the whole batch); ``out`` as in :func:`normalize`.
  """
  if out is None:
    out = np.empty((len(images),) + tuple(images[0].shape), np.float32)
  for i, img in enumerate(images):
    normalize(img, out[i])
  return out


def train_crop(
  img: Image.Image,
  rng: np.random.Generator,
  resize_size: int,
  crop_size: int,
  augment: bool = True,
) -> np.ndarray:
  """Resize to ``resize_size`` square, random crop ``crop_size``, random h-flip (no normalize).

  Args:
    img: RGB PIL image of any size.
    rng: numpy Generator (grain gives one per record, so augmentation is reproducible).
    augment: False gives the centre crop without flip (``input.augment=False``: parity checks
      and debugging).
  Returns:
    uint8 ``[crop_size, crop_size, 3]``; ``normalize`` of it is :func:`train_transform`.
    The train loader normalizes once per batch, straight into the batch buffer.
  """
  if crop_size > resize_size:
    raise ValueError(f'crop_size {crop_size} > resize_size {resize_size}')
  if img.size != (resize_size, resize_size):
    img = img.resize((resize_size, resize_size), Image.BILINEAR)
  if not augment:
    off = (resize_size - crop_size) // 2
    return np.asarray(img.crop((off, off, off + crop_size, off + crop_size)))
  top = int(rng.integers(0, resize_size - crop_size + 1))
  left = int(rng.integers(0, resize_size - crop_size + 1))
  # Crop and flip in PIL: contiguous output (a flipped numpy view costs a slow copy later).
  img = img.crop((left, top, left + crop_size, top + crop_size))
  if rng.random() < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(img)


def train_transform(
  img: Image.Image, rng: np.random.Generator, resize_size: int, crop_size: int
) -> np.ndarray:
  """Resize to ``resize_size`` square, random crop ``crop_size``, random h-flip, normalize.

  Args:
    img: RGB PIL image of any size.
    rng: numpy Generator (grain gives one per record, so augmentation is reproducible).
  Returns:
    float32 ``[crop_size, crop_size, 3]``.
  """
  return normalize(train_crop(img, rng, resize_size, crop_size))


def eval_transform(img: Image.Image, eval_size: int) -> np.ndarray:
  """Resize to ``eval_size`` square and normalize -> float32 ``[S, S, 3]``."""
  if img.size != (eval_size, eval_size):
    img = img.resize((eval_size, eval_size), Image.BILINEAR)
  return normalize(np.asarray(img))


def rescale_boxes(
  boxes: np.ndarray, size: tuple[int, int], eval_size: int | tuple[int, int]
) -> np.ndarray:
  """Original-pixel boxes ``[N, 4]`` (x0,y0,x1,y1) -> eval-size boxes, int32 ``[N, 4]``.

  The reference's rule (its ``resize_bbox``) ``int(x * S / w)`` (x with w, y with h), in float64
  like Python floats; the one rule of the eval loader and the WSOL CLI. ``size`` is the
  original (w, h); ``eval_size`` the target side S, or its (W, H) (score maps of any shape).
  """
  w, h = size
  new_w, new_h = (eval_size, eval_size) if np.ndim(eval_size) == 0 else eval_size
  boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
  scale = np.array([new_w, new_h, new_w, new_h], dtype=np.float64)
  div = np.array([w, h, w, h], dtype=np.float64)
  return np.trunc(boxes * scale / div).astype(np.int32)


def _read_mask(path: str, eval_size: int, where: str) -> np.ndarray:
  # The protocol reads masks with OpenCV (grayscale) and resizes with INTER_NEAREST.
  mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
  if mask is None:
    raise BadImageError(f'missing or unreadable mask file {path} (listed for {where})')
  mask = cv2.resize(
    mask.astype(np.float32), (eval_size, eval_size), interpolation=cv2.INTER_NEAREST
  )
  # `> 0.5` on the raw 0..255 values, exactly as the reference (0/255 masks: same as /255).
  return mask > 0.5


def build_mask(
  mask_paths: list[str], ignore_path: str | None, eval_size: int, where: str = ''
) -> np.ndarray:
  """GT mask as in wsolevaluation: uint8 ``[S, S]``, 1 = object, 0 = background, 255 = ignore.

  ``mask_paths``/``ignore_path`` are full file paths. Instances are OR-ed; the ignore region is
  the ignore mask minus the instances.
  """
  fg = np.zeros((eval_size, eval_size), dtype=bool)
  for p in mask_paths:
    fg |= _read_mask(p, eval_size, where)
  out = fg.astype(np.uint8)
  if ignore_path is not None:
    ignore = _read_mask(ignore_path, eval_size, where) & ~fg
    out[ignore] = 255
  return out
