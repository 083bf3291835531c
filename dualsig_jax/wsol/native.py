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
this folder as a plain C library, loaded here with ctypes: nothing is compiled at run time.
ctypes releases the GIL during each call, so per-image work runs in parallel on threads.

A damaged library must never take the process down (a garbled code section, dynamic section or
symbol table dies of SIGSEGV / SIGFPE inside ``dlopen`` or the first call, where no Python code
can catch it), so :func:`load` verifies it before loading it in this process:

- setup.py records the library's sha256 next to it at build time (``<library>.sha256``): a
  library whose bytes differ is not loaded at all;
- a library without that record (built by hand, or by an older version) is first loaded and
  checked in a child process with a time limit; the child's verdict is cached, keyed by the
  library's sha256, in ``$XDG_CACHE_HOME/dualsig_jax`` (``~/.cache/dualsig_jax``), so this costs
  one child once per library;
- then it is opened here and checked on a small map with holes, an island and a tie against the
  exact fallback's answer.

Any failure (no compiler at install, a mismatch, a child that dies, loops or exits early, a
library that does not load or fails the check) warns once in one line, naming the cost, and
:func:`load` returns None: callers then use the exact per-level OpenCV fallback
(:mod:`dualsig_jax.wsol.levels`). ``DUALSIG_JAX_NATIVE=0`` chooses the fallback without a
warning. :func:`status` says which path is in use.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import warnings

import numpy as np

__all__ = ['load', 'status', 'level_ious', 'level_lut', 'library_path', 'check_library']

_FOLDER = os.path.dirname(os.path.abspath(__file__))
# The folder holding this copy of dualsig_jax: the child process imports this very package.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(_FOLDER))
_MAX_SIDE = 16384  # int16 coordinates, int32 areas: larger maps take the fallback
# What the fallback costs (bench/bench_wsol.py, 224x224 maps, interval 0.001, one core).
FALLBACK_COST = 'about 8x slower than the kernel on typical maps, over 20x on speckled ones'
_LOCK = threading.Lock()
_STATE = None  # None: not tried yet; else (kernel function or None, status line)
DIGEST_SUFFIX = '.sha256'  # setup.py writes <library>.sha256 when it builds the library
# Seconds the child process may take to import numpy/OpenCV, load and check the library.
_CHILD_TIMEOUT = 60.0
# The child: load and check the library given, exit 0 if right. DUALSIG_JAX_NATIVE=0 in its
# environment keeps its own `import dualsig_jax.wsol` from loading (or checking) any library.
# It prints _CHILD_OK only after a passed check: a library that ends the process early with
# status 0 (exit() in a constructor) is not taken for a good one.
_CHILD_OK = 'dualsig_jax: kernel check passed'
_CHILD = (
  'import sys\n'
  'from dualsig_jax.wsol import native\n'
  'ok = native.check_library(sys.argv[1])\n'
  'print(native._CHILD_OK if ok else "self-check failed", flush=True)\n'
  'sys.exit(0 if ok else 3)\n'
)


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


def level_lut(levels: np.ndarray) -> np.ndarray:
  """int16 ``[256]``: the level index of each uint8 value (``#levels < value``), the kernel's
  input; level i keeps the pixels whose index is > i."""
  return np.searchsorted(levels, np.arange(256), side='left').astype(np.int16)


def _check_map():
  """(q, levels, gt boxes, expected (multi, largest, largest_first, flags)): a map with a hole,
  an island and a tie. The expected IoUs are those of the exact fallback (the reference's
  OpenCV tracing; tests/test_kernel_guard.py recomputes them), as exact fractions."""
  q = np.zeros((10, 12), np.uint8)
  q[1:7, 1:7] = 100  # a frame ...
  q[3:5, 3:5] = 0  # ... with a hole ...
  q[3, 3] = 200  # ... holding an island
  q[0:2, 10:12] = 50  # a plateau on the border
  q[9, 1], q[9, 4] = 200, 200  # two specks: with the island, a tie of the largest at level 150
  gt = np.array([[2, 2, 5, 5], [0, 0, 11, 9]], np.int64)
  lv = np.array([0, 49, 99, 150], np.int64)
  want = (
    np.array([16 / 25] * 3 + [1 / 4]),
    np.array([49 / 120] * 3 + [1 / 60]),
    np.array([16 / 49] * 3 + [0.0]),
    np.array([0, 0, 0, 1], np.int8),  # flag 1: the largest contour is ambiguous (the tie)
  )
  return q, lv, gt, want


def _self_check(fn) -> bool:
  """The kernel's per-level IoUs and flags on :func:`_check_map` are the exact ones."""
  q, lv, gt, want = _check_map()
  got = _call(fn, q, level_lut(lv), len(lv), gt)
  return all(np.array_equal(g, w) for g, w in zip(got, want))


def check_library(path: str) -> bool:
  """Loads the library at ``path`` in this process and checks its answers (what the child
  process runs; a damaged library may kill the process that calls this)."""
  return _self_check(_bind(path))


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _recorded_digest(path: str) -> str | None:
  """The sha256 setup.py recorded for the library at ``path`` when it built it, or None."""
  try:
    with open(path + DIGEST_SUFFIX) as f:
      return f.read().split()[0].strip().lower()
  except (OSError, IndexError):
    return None


def _cache_file(digest: str) -> str:
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'dualsig_jax', f'wsol-kernel-{digest}.json')


def _child_check(path: str) -> str:
  """'ok', or why the library failed, from loading and checking it in a child process."""
  env = {**os.environ, 'DUALSIG_JAX_NATIVE': '0'}
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get('PYTHONPATH')]))
  try:
    proc = subprocess.run(
      [sys.executable, '-c', _CHILD, path],
      env=env,
      capture_output=True,
      text=True,
      timeout=_CHILD_TIMEOUT,
      cwd=tempfile.gettempdir(),  # never a user folder that shadows the package
    )
  except subprocess.TimeoutExpired:
    return f'its check in a child process did not finish within {_CHILD_TIMEOUT:.0f} s'
  except OSError as e:
    return f'its check in a child process could not start ({e})'
  if proc.returncode == 0 and _CHILD_OK in proc.stdout:
    return 'ok'
  if proc.returncode < 0:
    try:
      name = signal.Signals(-proc.returncode).name
    except ValueError:
      name = f'signal {-proc.returncode}'
    return f'it killed its check process ({name})'
  if proc.returncode == 3:
    return 'it failed its self-check (in a child process)'
  if proc.returncode == 0:
    return 'it ended its check process before the check ran (exit status 0)'
  tail = [x for x in proc.stderr.splitlines() if x.strip()][-1:] or ['no message']
  return f'it does not load in a child process ({tail[0][:200]})'


def _child_verdict(path: str, digest: str) -> tuple[str, str | None]:
  """(verdict, cache file) for a library with no recorded digest: the cached verdict for its
  digest, else a fresh child check, cached when the cache folder is writable."""
  cache = _cache_file(digest)
  try:
    with open(cache) as f:
      record = json.load(f)
    if record.get('sha256') == digest and isinstance(record.get('verdict'), str):
      return record['verdict'], cache
  except (OSError, ValueError, AttributeError):
    pass
  verdict = _child_check(path)
  try:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f'{cache}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump({'sha256': digest, 'verdict': verdict, 'library': path}, f)
    os.replace(tmp, cache)
  except OSError:  # no writable cache: the check runs again next time
    return verdict, None
  return verdict, cache


def _verify(path: str) -> str | None:
  """Why the library at ``path`` must not be loaded in this process, or None."""
  broken = _truncated(path)
  if broken:
    return f'{path} does not load ({broken})'
  digest = _sha256(path)
  recorded = _recorded_digest(path)
  if recorded is not None:
    if recorded != digest:
      return (
        f'{path} is not the library built at install time (its sha256 differs from the one '
        f'recorded in {path}{DIGEST_SUFFIX}: damaged or replaced)'
      )
    return None
  verdict, cache = _child_verdict(path, digest)
  if verdict == 'ok':
    return None
  again = f'; delete {cache} to check it again' if cache else ''
  return f'{path} was refused: {verdict}{again}'


def _open():
  """(kernel function or None, status line, warning or None)."""
  if os.environ.get('DUALSIG_JAX_NATIVE', '1') == '0':
    return None, 'fallback: DUALSIG_JAX_NATIVE=0', None
  path = library_path()
  if path is None:
    why = f'not built at install time (no {_FOLDER}/_levelsets*.so: no C compiler then?)'
  else:
    try:
      why = _verify(path)
      if why is None:
        fn = _bind(path)
        ok = _self_check(fn)
    except (OSError, AttributeError, MemoryError, struct.error) as e:
      why = f'{path} does not load ({e})'
    if why is None:
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
