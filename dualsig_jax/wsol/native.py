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
  reference takes the first in OpenCV's list: the one whose first pixel (raster order) comes
  last, as OpenCV lists the components it meets in reverse order (see ``_levelsets.c``).

Built when the package is installed (pyproject.toml ``ext-modules``, reported by setup.py) into
this folder as a plain C library, loaded here with ctypes: nothing is compiled at run time and
nothing is cached outside the package. ctypes releases the GIL during each call, so per-image work
runs in parallel on threads. :func:`load` opens it once and checks it on a small map with holes
against the exact fallback; without it (no compiler at install, ``DUALSIG_JAX_NATIVE=0``, or a
library that does not load or fails the check) it warns once, naming the cost, and returns None:
callers then use the exact per-level OpenCV fallback (:mod:`dualsig_jax.wsol.levels`).
:func:`status` says which path is in use.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import struct
import threading
import warnings

import numpy as np

__all__ = ['load', 'status', 'level_ious', 'library_path']

_FOLDER = os.path.dirname(os.path.abspath(__file__))
_MAX_SIDE = 16384  # int16 coordinates, int32 areas: larger maps take the fallback
# What the fallback costs (bench/bench_wsol.py, 224x224 maps, interval 0.001, one core).
FALLBACK_COST = 'about 8x slower than the kernel on typical maps, over 20x on speckled ones'
_LOCK = threading.Lock()
_STATE = None  # None: not tried yet; else (kernel function or None, status line)


def library_path() -> str | None:
  """The kernel library built into this folder at install time, or None if it was not built."""
  for suffix in importlib.machinery.EXTENSION_SUFFIXES:
    path = os.path.join(_FOLDER, '_levelsets' + suffix)
    if os.path.isfile(path):
      return path
  return None


def _truncated(path) -> str | None:
  """Why an ELF library is shorter than its own headers say, else None.

  dlopen of a truncated library does not fail: the process dies of SIGBUS when the loader touches
  the missing pages, so this is checked before (other formats are left to the loader)."""
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(64)
    if head[:4] != b'\x7fELF':
      return None
    wide, order = head[4] == 2, '<' if head[5] == 1 else '>'
    # e_phoff, e_shoff, then e_phentsize, e_phnum, e_shentsize, e_shnum (after 4 more fields).
    fmt = order + ('QQIHHHHH' if wide else 'IIIHHHHH')
    phoff, shoff, _, _, phsize, phnum, shsize, shnum = struct.unpack_from(
      fmt, head, 32 if wide else 28
    )
    ends = [phoff + phnum * phsize, shoff + shnum * shsize]
    f.seek(phoff)
    table = f.read(phnum * phsize)
  for k in range(phnum if len(table) == phnum * phsize else 0):
    # p_offset and p_filesz of each segment (the bytes the loader maps).
    if wide:
      offset, filesz = struct.unpack_from(order + 'Q16xQ', table, k * phsize + 8)
    else:
      offset, filesz = struct.unpack_from(order + 'I8xI', table, k * phsize + 4)
    ends.append(offset + filesz)
  if max(ends) > size:
    return f'truncated ({size} bytes; its headers need {max(ends)})'
  return None


def _bind(path):
  fn = ctypes.CDLL(path).wsol_level_ious
  # Plain pointers: level_ious makes every array contiguous with the right dtype itself
  # (ndpointer's per-call checks cost more than the smallest maps' work).
  ptr, i32 = ctypes.c_void_p, ctypes.c_int32
  fn.argtypes = [ptr, i32, i32, ptr, i32, ptr, i32, ptr, ptr, ptr, ptr]
  fn.restype = ctypes.c_int
  return fn


def _self_check(fn) -> bool:
  """The kernel's per-level IoUs on a map with a hole, an island and a tie equal the fallback's
  (OpenCV's)."""
  from dualsig_jax.wsol import levels  # the exact fallback (imports this module)

  q = np.zeros((10, 12), np.uint8)
  q[1:7, 1:7] = 100  # a frame ...
  q[3:5, 3:5] = 0  # ... with a hole ...
  q[3, 3] = 200  # ... holding an island
  q[0:2, 10:12] = 50  # a plateau on the border
  q[9, 1], q[9, 4] = 200, 200  # two specks: with the island, a tie of the largest at level 150
  gt = np.array([[2, 2, 5, 5], [0, 0, 11, 9]], np.int64)
  lv = np.array([0, 49, 99, 150], np.int64)
  want = levels.exact_level_ious(q, lv, gt)
  got = _call(fn, q, levels.level_lut(lv), len(lv), gt)
  return bool(got[3][3] & 1) and all(np.array_equal(g, w) for g, w in zip(got, want))


def _open():
  """(kernel function or None, status line, warning or None)."""
  if os.environ.get('DUALSIG_JAX_NATIVE', '1') == '0':
    return None, 'fallback: DUALSIG_JAX_NATIVE=0', None
  path = library_path()
  if path is None:
    why = f'not built at install time (no {_FOLDER}/_levelsets*.so: no C compiler then?)'
  else:
    try:
      broken = _truncated(path)
      if broken:
        raise OSError(broken)
      fn = _bind(path)
      ok = _self_check(fn)
    except (OSError, AttributeError, MemoryError, struct.error) as e:
      why = f'{path} does not load ({e})'
    else:
      if ok:
        source = os.path.join(_FOLDER, '_levelsets.c')
        stale = os.path.isfile(source) and os.path.getmtime(source) > os.path.getmtime(path)
        # An editable install keeps the library it built: a changed source needs a rebuild.
        warning = (
          f'{path} is older than {source}: rebuild it with pip install -e .' if stale else None
        )
        return fn, f'native: {path}', warning
      why = f'{path} failed its self-check'
  line = f'fallback: the WSOL box kernel is {why}' if path is None else f'fallback: {why}'
  return (
    None,
    line,
    (
      f'WSOL box kernel unavailable: {why}. The box evaluator uses the exact per-level OpenCV '
      f'fallback, {FALLBACK_COST}; reinstall the package where a C compiler exists to build it.'
    ),
  )


def load():
  """The kernel function, or None when it is unavailable (warns once) or disabled."""
  global _STATE
  if _STATE is None:
    with _LOCK:
      if _STATE is None:
        fn, line, warning = _open()
        _STATE = (fn, line)
        if warning:
          warnings.warn(warning, RuntimeWarning, stacklevel=2)
  return _STATE[0]


def status() -> str:
  """``'native: <library path>'`` or ``'fallback: <reason>'`` (loads the kernel if needed)."""
  load()
  return _STATE[1]


def _call(fn, q, lut, num_levels, gt):
  out = [np.empty(num_levels, np.float64) for _ in range(3)]
  flags = np.empty(num_levels, np.int8)
  arrays = (q, lut, gt, *out, flags)
  q_p, lut_p, gt_p, m_p, l_p, f_p, fl_p = (a.ctypes.data for a in arrays)
  status_ = fn(q_p, q.shape[0], q.shape[1], lut_p, num_levels, gt_p, len(gt), m_p, l_p, f_p, fl_p)
  if status_ != 0:
    raise MemoryError('WSOL box kernel: out of memory')
  return (*out, flags)


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
  return _call(fn, q, lut, num_levels, gt)
