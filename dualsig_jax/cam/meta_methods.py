"""Methods built on other methods' maps (pytorch-grad-cam 1.5.7's meta-methods): RefineCAM (the
product of one method's maps over several layers) and SESS (a method's maps over sliding
windows of several scales, weighted by each window's score and fused).

Both call ``explain`` for the maps they combine, so every model, layer and option of ``explain``
works here; formulas read from the package's ``refine_cam.py`` and ``sess.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dualsig_jax.cam.explain import explain
from dualsig_jax.cam.methods import scale_cam_image


def refine_cam(
  model,
  variables,
  images: jax.Array,
  target_layers: Sequence,
  method: str = 'gradcam++',
  targets: jax.Array | None = None,
  **explain_kwargs,
):
  """RefineCAM: ``scale_cam_image(prod_l map_l)``, ``map_l`` the ``method``'s final map at layer
  ``l`` (each already ReLU'd, resized and in [0, 1]), as the package's ``RefineCAM`` with
  ``base_method`` = that method (default Grad-CAM++, the package's). The package's loop meant to
  rescale each map to [0, 1] before the product changes nothing (it rebinds a loop variable);
  the maps are in [0, 1] already, so the product is the same.

  Args:
    model, variables, images ``[B, H, W, C]``: as :func:`explain`.
    target_layers: two or more layers, as ``explain``'s ``target_layer`` each.
    method: a name of ``EXPLAIN_METHODS``.
    targets: int ``[B]`` or None (each layer's call takes the argmax, the same for all).
    **explain_kwargs: passed to every ``explain`` call (``logits_fn``, ``eigen_smooth``,
      ``reshape_transform``, model call arguments...).
  Returns:
    ``(maps float32 [B, H, W] in [0, 1], targets int32 [B])``.
  """
  if isinstance(target_layers, str) or len(target_layers) < 1:
    raise ValueError(
      f'target_layers must be a list of layers (RefineCAM multiplies their maps), got '
      f'{target_layers!r}'
    )
  product, out_targets = None, None
  for layer in target_layers:
    maps, t = explain(model, variables, images, layer, (method,), targets, **explain_kwargs)
    product = maps[method] if product is None else product * maps[method]
    out_targets = t if out_targets is None else out_targets
  return scale_cam_image(product), out_targets


def _upsample_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``[out, in]`` float32 matrix of torch's bilinear resize (``align_corners=False``), the
  interpolation torchvision's ``resize`` does when it enlarges (its antialiasing only acts when
  it shrinks: for an enlargement its weights are these)."""
  m = np.zeros((out_size, in_size), np.float64)
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(int), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  np.add.at(m, (np.arange(out_size), i0), 1.0 - lam)
  np.add.at(m, (np.arange(out_size), i1), lam)
  return m.astype(np.float32)


def _scaled_size(h: int, w: int, scale: int) -> tuple[int, int]:
  """torchvision ``resize(img, scale)``: the shorter side becomes ``scale``."""
  if h <= w:
    return scale, int(scale * w / h)
  return int(scale * h / w), scale


def _window_starts(length: int, step: int, window: int) -> list[int]:
  """The package's ``window_starts``: the last window is shifted back inside the image."""
  starts = []
  for start in range(0, length, step):
    if start + window >= length:
      starts.append(max(length - window, 0))
      break
    starts.append(start)
  return starts


def _gaussian_blur(maps: jax.Array, size: int = 11, sigma: float = 5.0) -> jax.Array:
  """``cv2.GaussianBlur(m, (size, size), sigma)`` per map (separable, BORDER_REFLECT_101 =
  numpy's 'reflect'). ``[B, H, W]`` -> ``[B, H, W]``."""
  r = size // 2
  k = np.exp(-((np.arange(size) - r) ** 2) / (2.0 * sigma * sigma))
  k = jnp.asarray((k / k.sum()).astype(np.float32))
  p = jnp.pad(maps, ((0, 0), (r, r), (r, r)), mode='reflect')
  h, w = maps.shape[1:]
  rows = sum(k[i] * p[:, i : i + h, :] for i in range(size))
  return sum(k[i] * rows[:, :, i : i + w] for i in range(size))


def sess(
  model,
  variables,
  images: jax.Array,
  target_layer,
  method: str = 'gradcam',
  targets: jax.Array | None = None,
  *,
  scales: Sequence[int] | None = None,
  num_scales: int = 12,
  scale_step_ratio: float = 2.0 / 7.0,
  window_size: int | None = None,
  step_size: int | None = None,
  pre_filter_ratio: float = 0.0,
  theta: float = 0.0,
  pool: str = 'mean',
  smooth: bool = True,
  use_softmax_scores: bool = True,
  batch_size: int = 64,
  logits_fn=None,
  **explain_kwargs,
):
  """SESS (Tursun et al. 2022, "Saliency Enhancing with Scaling and Sliding"), as the package's
  ``SESS`` with ``base_method`` = ``method``.

  Per image: the image resized (torchvision's bilinear, shorter side) to each scale (default
  ``num_scales`` scales from the window size up by ``round(window * scale_step_ratio)``); square
  windows of ``window_size`` (default the shorter side) slid with ``step_size`` (default the
  window) over each; each window scored (softmax probability of the target, or the raw logit,
  clipped at 0), the lowest ``pre_filter_ratio`` dropped, the rest explained by ``method``
  (the patches in chunks of ``batch_size`` through :func:`explain`), weighted by score / best
  score, pasted back at their place and resized to the image (cv2's bilinear), fused by the
  mean of the values above ``theta`` (``pool='mean'``) or the maximum, blurred (11x11 Gaussian,
  sigma 5) and min-max scaled.

  Args:
    model, variables, images ``[B, H, W, C]``, target_layer, method, logits_fn,
      **explain_kwargs: as :func:`explain`.
    targets: int ``[B]`` or None (the argmax of each whole image).
  Returns:
    ``(maps float32 [B, H, W] in [0, 1], targets int32 [B])``.
  """
  from dualsig_jax.cam.resize import resize_matrix
  from dualsig_jax.cam.road_metrics import _score
  from dualsig_jax.cam.target_layer import model_forward

  if pool not in ('mean', 'max'):
    raise ValueError(f"unknown pool {pool!r}; valid: ('mean', 'max')")
  if not 0.0 <= pre_filter_ratio < 1.0:
    raise ValueError(f'pre_filter_ratio must be in [0, 1), got {pre_filter_ratio}')
  if num_scales < 1:
    raise ValueError(f'num_scales must be >= 1, got {num_scales}')
  b, h, w = images.shape[:3]
  call_kwargs = {
    k: v for k, v in explain_kwargs.items() if k not in _EXPLAIN_ARGS
  }  # model call arguments go to the scoring forward too
  forward, state = model_forward(model, variables, logits_fn=logits_fn, call_kwargs=call_kwargs)
  fwd = jax.jit(lambda s, x: forward(s, x))
  if targets is None:
    targets = jnp.argmax(fwd(state, images), axis=-1).astype(jnp.int32)
  targets = jnp.asarray(targets, jnp.int32)
  win = int(window_size) if window_size is not None else min(h, w)
  step = int(step_size) if step_size is not None else win
  if scales is None:
    inc = int(round(win * scale_step_ratio))
    scales = [win + inc * i for i in range(num_scales)]
  patches, places = [], []  # per patch: [B, win, win, C] and (y1, x1, scaled h, scaled w)
  for scale in scales:
    if scale < win:
      raise ValueError(f'every scale must be at least the window size {win}, got {scale}')
    sh, sw = _scaled_size(h, w, int(scale))
    ry, rx = jnp.asarray(_upsample_matrix(h, sh)), jnp.asarray(_upsample_matrix(w, sw))
    hi = jax.lax.Precision.HIGHEST
    scaled = jnp.einsum('Yy,byxc,Xx->bYXc', ry, images.astype(jnp.float32), rx, precision=hi)
    for y1 in _window_starts(sh, step, win):
      for x1 in _window_starts(sw, step, win):
        patches.append(scaled[:, y1 : y1 + win, x1 : x1 + win].astype(images.dtype))
        places.append((y1, x1, sh, sw))
  n = len(patches)
  stack = jnp.stack(patches, axis=1).reshape((b * n, win, win) + images.shape[3:])
  rep_targets = jnp.repeat(targets, n)
  act = 'softmax' if use_softmax_scores else 'logit'
  scores = jnp.concatenate(
    [
      _score(fwd(state, stack[i : i + batch_size]), rep_targets[i : i + batch_size], act)
      for i in range(0, b * n, batch_size)
    ]
  )
  scores = jnp.maximum(scores, 0.0).reshape(b, n)
  cams = []
  for i in range(0, b * n, batch_size):
    chunk = stack[i : i + batch_size]
    pad = batch_size - chunk.shape[0] if b * n > batch_size else 0
    t = rep_targets[i : i + batch_size]
    if pad:  # one compile: the last chunk padded to the others' shape
      chunk = jnp.concatenate([chunk, jnp.repeat(chunk[-1:], pad, axis=0)])
      t = jnp.concatenate([t, jnp.repeat(t[-1:], pad)])
    maps, _ = explain(
      model, variables, chunk, target_layer, (method,), t, logits_fn=logits_fn, **explain_kwargs
    )
    cams.append(maps[method][: maps[method].shape[0] - pad])
  cams = jnp.concatenate(cams).reshape(b, n, win, win)
  dropped = int(n * pre_filter_ratio)
  rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)  # 0 = the lowest score
  kept = rank >= dropped
  best = jnp.max(scores, axis=1, keepdims=True)
  weights = jnp.where(best > 0, scores / jnp.where(best > 0, best, 1.0), 1.0)
  total = jnp.zeros((b, h, w), jnp.float32)
  counts = jnp.zeros((b, h, w), jnp.float32)
  for j, (y1, x1, sh, sw) in enumerate(places):
    my = jnp.asarray(resize_matrix(sh, h, 'linear'))[:, y1 : y1 + win]
    mx = jnp.asarray(resize_matrix(sw, w, 'linear'))[:, x1 : x1 + win]
    cam = cams[:, j] * weights[:, j, None, None]
    pasted = jnp.einsum('Yy,byx,Xx->bYX', my, cam, mx, precision=jax.lax.Precision.HIGHEST)
    keep = kept[:, j, None, None]
    if pool == 'max':
      total = jnp.where(keep, jnp.maximum(total, pasted), total)
    else:
      above = (pasted > theta) & keep
      total = total + jnp.where(above, pasted, 0.0)
      counts = counts + above
  if pool == 'mean':
    total = jnp.where(counts > 0, total / jnp.where(counts > 0, counts, 1.0), 0.0)
  if smooth:
    total = _gaussian_blur(total)
  return scale_cam_image(total), targets


# explain's own arguments (the rest of **explain_kwargs are model call arguments).
_EXPLAIN_ARGS = frozenset(
  (
    'reshape_transform',
    'batch_size',
    'eigen_smooth',
    'aug_smooth',
    'truncate_negative_weights',
    'output_size',
    'options',
  )
)
