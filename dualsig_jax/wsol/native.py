"""Compiled kernel for the per-level contour IoUs of one map (``_levelsets.c``, via ctypes).

The level sets ``{v > i}`` of a quantized map are nested, so one pass of union-find over its
pixels, level after level, holds every level's components; nothing is traced. What it relies
on (checked end to end against a literal port of the reference on random, constructed and
realistic maps in tests/test_wsol_box.py):

- ``cv2.findContours(RETR_TREE)`` gives one outer border per 8-connected foreground component
  and one hole border per 4-connected background component not reaching the image border;
- an outer border's ``boundingRect`` is its component's box; a hole border runs through the
  foreground pixels 4-adjacent to the hole, so its box is the hole's box grown by one pixel;
- ``cv2.contourArea`` of an outer border (shoelace through its pixels' centres) is
  ``F4 + F3 / 2``, ``Fk`` the number of 2x2 windows with ``k`` pixels in the filled component
  (the component and everything it encloses); a contour inside another is strictly smaller,
  so the largest contour is the largest filled component. Filled components are the
  components of ``{e > i}``, ``e(p)`` being the lowest level at which ``p`` is background
  connected to the border. When several filled components share the largest area, the
  reference's choice depends on OpenCV's contour order: the kernel flags the level and the
  caller traces it.

The kernel is compiled on first use with the system C compiler (``$CC``, else ``cc``) into a
per-user cache (``$DUALSIG_JAX_CACHE``, else ``~/.cache/dualsig_jax``), named by the source's
hash; processes share it. Without a compiler, or with ``DUALSIG_JAX_NATIVE=0``, :func:`load`
returns None and callers use the pure numpy / OpenCV path (same results, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import warnings

import numpy as np

__all__ = ['load', 'level_ious']

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_levelsets.c')
_KERNEL = None  # None: not tried yet; False: unavailable
_MAX_SIDE = 16384  # larger maps take the traced path


def _cache_dir() -> str:
  root = os.environ.get('DUALSIG_JAX_CACHE') or os.path.join(
    os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'),
    'dualsig_jax',
  )
  os.makedirs(root, mode=0o700, exist_ok=True)
  return root


def _compile() -> str:
  """Path of the shared library, compiled if the cache does not hold this source's build."""
  with open(_SOURCE, 'rb') as f:
    source = f.read()
  tag = hashlib.sha256(source + platform.machine().encode()).hexdigest()[:16]
  cache = _cache_dir()
  path = os.path.join(cache, f'levelsets-{tag}.so')
  if not os.path.isfile(path):
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=cache)
    os.close(fd)
    try:
      cmd = [
        *shlex.split(os.environ.get('CC') or 'cc'),
        '-O2',
        '-shared',
        '-fPIC',
        '-o',
        tmp,
        _SOURCE,
      ]
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
      if proc.returncode != 0:
        raise OSError(f'{" ".join(cmd)} failed: {proc.stderr.strip()[-500:]}')
      os.replace(tmp, path)  # atomic: concurrent workers each install a complete file
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return path


def load():
  """The kernel function, or None when it cannot be built (warns once) or is disabled."""
  global _KERNEL
  if _KERNEL is None:
    _KERNEL = False
    if os.environ.get('DUALSIG_JAX_NATIVE', '1') != '0':
      try:
        fn = ctypes.CDLL(_compile()).wsol_level_ious
      except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(
          f'WSOL box kernel unavailable ({e}); using the slower pure numpy/OpenCV path',
          RuntimeWarning,
          stacklevel=2,
        )
      else:
        # Plain pointers: level_ious makes every array contiguous with the right dtype itself
        # (ndpointer's per-call checks cost more than the smallest maps' work).
        ptr, i32 = ctypes.c_void_p, ctypes.c_int32
        fn.argtypes = [ptr, i32, i32, ptr, i32, ptr, i32, ptr, ptr, ptr, ptr]
        fn.restype = ctypes.c_int
        _KERNEL = fn
  return _KERNEL or None


def level_ious(q: np.ndarray, lut: np.ndarray, num_levels: int, gt_boxes: np.ndarray):
  """Per-level IoUs of one map by the kernel.

  Args:
    q: uint8 ``[H, W]`` quantized map.
    lut: int16 ``[256]`` level index of each value (level i keeps ``lut[q] > i``).
    num_levels: L.
    gt_boxes: int64 ``[G, 4]`` (x0, y0, x1, y1), G >= 1.
  Returns:
    ``(multi, largest, largest_first, flags)``: float64 ``[L]`` x3 and int8 ``[L]`` (see
    ``_levelsets.c``: multi -1 and flag 2 where a level has no contour, flag 1 where the
    largest contour is ambiguous), or None when the kernel is unavailable or the map is larger
    than it handles (int16 coordinates, int32 areas).
  """
  gt = np.ascontiguousarray(gt_boxes, dtype=np.int64).reshape(-1, 4)
  if len(gt) == 0:
    raise ValueError('gt_boxes must hold at least one box')
  fn = load()
  if fn is None or max(q.shape) > _MAX_SIDE:
    return None
  q = np.ascontiguousarray(q, dtype=np.uint8)
  lut = np.ascontiguousarray(lut, dtype=np.int16)
  if lut.shape != (256,) or q.ndim != 2:
    raise ValueError(f'expected q [H, W] and lut [256]; got {q.shape}, {lut.shape}')
  out = [np.empty(num_levels, np.float64) for _ in range(3)]
  flags = np.empty(num_levels, np.int8)
  arrays = (q, lut, gt, *out, flags)
  q_p, lut_p, gt_p, m_p, l_p, f_p, fl_p = (a.ctypes.data for a in arrays)
  status = fn(q_p, q.shape[0], q.shape[1], lut_p, num_levels, gt_p, len(gt), m_p, l_p, f_p, fl_p)
  if status != 0:
    raise MemoryError('WSOL box kernel: out of memory')
  return (*out, flags)
