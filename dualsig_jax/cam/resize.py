"""On-device map resizing that reproduces ``cv2.resize`` for float32 maps.

The reference pipeline resizes CAMs with OpenCV on the host, one image at a time. Both
interpolations it uses are separable and linear in the input, so a resize from ``[h, w]`` to
``[H, W]`` is exactly ``Ry @ m @ Rx.T`` with two small constant matrices ``Ry [H, h]`` and
``Rx [W, w]``. Building those matrices with OpenCV's own coordinate rule lets the whole batch be
resized on the accelerator with two matmuls while matching ``cv2.resize`` to float32 rounding.

OpenCV's rule (``resizeGeneric_`` in ``imgproc/src/resize.cpp``), per output index ``d``:
  ``f = float((d + 0.5) * (in / out) - 0.5)``, ``s = floor(f)``, ``t = f - s`` (half-pixel centres);
  taps at ``s + k`` with indices clamped to ``[0, in - 1]`` (a replicated border);
  ``INTER_LINEAR``: taps ``k in {0, 1}`` with weights ``(1 - t, t)``;
  ``INTER_CUBIC``: taps ``k in {-1, 0, 1, 2}`` with the Keys kernel, ``a = -0.75``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dualsig_jax.cam.methods import at_least_f32

INTERPOLATIONS = ('linear', 'cubic')
_CUBIC_A = -0.75


def _cubic_coeffs(t: np.ndarray) -> np.ndarray:
  """OpenCV's ``interpolateCubic``: 4 weights for taps ``s-1..s+2``; ``t`` in [0, 1)."""
  a = np.float32(_CUBIC_A)
  c0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
  c1 = ((a + 2) * t - (a + 3)) * t * t + 1
  c2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
  c3 = 1 - c0 - c1 - c2
  return np.stack([c0, c1, c2, c3], axis=-1).astype(np.float32)


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, interpolation: str) -> np.ndarray:
  """The ``[out_size, in_size]`` float32 matrix of a 1-D ``cv2.resize``.

  Args:
    in_size: source length (> 0).
    out_size: destination length (> 0).
    interpolation: ``'linear'`` (``cv2.INTER_LINEAR``) or ``'cubic'`` (``cv2.INTER_CUBIC``).
  Returns:
    float32 ``[out_size, in_size]``; row ``d`` holds the weights of output ``d``.
  """
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f'unknown interpolation {interpolation!r}; valid: {INTERPOLATIONS}')
  if in_size <= 0 or out_size <= 0:
    raise ValueError(f'resize sizes must be positive, got {in_size} -> {out_size}')
  if in_size == out_size:
    # cv2.resize copies when the size is unchanged; the kernels below give the same
    # identity, this just avoids float noise.
    return np.eye(out_size, dtype=np.float32)
  scale = in_size / out_size  # OpenCV keeps this in double ...
  d = np.arange(out_size, dtype=np.float64)
  f = ((d + 0.5) * scale - 0.5).astype(np.float32)  # ... and rounds the position to float.
  s = np.floor(f).astype(np.int64)
  t = (f - s.astype(np.float32)).astype(np.float32)
  if interpolation == 'linear':
    offsets = np.array([0, 1])
    w = np.stack([1 - t, t], axis=-1)
  else:
    offsets = np.array([-1, 0, 1, 2])
    w = _cubic_coeffs(t)
  idx = np.clip(s[:, None] + offsets[None, :], 0, in_size - 1)
  m = np.zeros((out_size, in_size), np.float64)
  # np.add.at sums the weights of taps that the border clamp merged onto one pixel.
  np.add.at(m, (np.repeat(np.arange(out_size), len(offsets)), idx.ravel()), w.ravel())
  return m.astype(np.float32)


def resize_maps(maps: jax.Array, size: tuple[int, int], interpolation: str = 'cubic') -> jax.Array:
  """Resize a batch of 2-D maps like ``cv2.resize(m, (W, H), interpolation=...)`` per map.

  Args:
    maps: float ``[B, h, w]``.
    size: ``(H, W)`` (rows, columns; note that cv2's ``dsize`` is ``(W, H)``).
    interpolation: ``'cubic'`` or ``'linear'``.
  Returns:
    float32 ``[B, H, W]``. Jittable; the matrices are trace-time constants.
  """
  if maps.ndim != 3:
    raise ValueError(f'maps must be [B, h, w], got shape {maps.shape}')
  out_h, out_w = (int(v) for v in size)
  _, in_h, in_w = maps.shape
  ry = jnp.asarray(resize_matrix(in_h, out_h, interpolation))
  rx = jnp.asarray(resize_matrix(in_w, out_w, interpolation))
  # HIGHEST: accelerators otherwise may run f32 matmuls in bf16 passes, breaking cv2 parity.
  hi = jax.lax.Precision.HIGHEST
  tmp = jnp.einsum('Hh,bhw->bHw', ry, at_least_f32(maps), precision=hi)
  return jnp.einsum('bHw,Ww->bHW', tmp, rx, precision=hi)
