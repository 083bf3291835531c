"""pytorch-grad-cam 1.5.7's confidence metrics: CamMultImageConfidenceChange and ROAD.

Both are ``score(perturbed image) - score(image)`` per image, the score being the target's raw
logit (the package's ``ClassifierOutputTarget``; pass ``activation='softmax'`` or ``'sigmoid'``
for a probability instead), jitted and batched on device:

* ``cam_mult_image_confidence_change``: the perturbed image is ``image * map`` (the normalized
  input tensor times the map, as ``multiply_tensor_with_cam``).
* ``road`` (Rong et al., ICML 2022, "Remove And Debias"): the pixels whose map value is at or
  above the ``p``-th percentile (MoRF; for LeRF, of ``1 - map``) are replaced by the noisy linear
  imputation: each removed pixel equals the weighted mean of its 8 neighbours (weights 1/6 for
  the 4 direct, 1/12 for the diagonal ones), a sparse linear system solved here by conjugate
  gradients on device (the package uses ``scipy.sparse.linalg.spsolve`` per image on the host),
  plus ``noise * N(0, 1)``. ``road_average`` averages over percentiles; ``road_combined`` is
  ``(LeRF average - MoRF average) / 2`` (the package's ``ROADCombined``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.scipy.sparse.linalg import cg

from dualsig_jax.cam.target_layer import model_forward

ACTIVATIONS = ('logit', 'softmax', 'sigmoid')
ORDERS = ('morf', 'lerf')
_DIRECT, _DIAGONAL = 1.0 / 6.0, 1.0 / 12.0
DEFAULT_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def _score(logits, targets, activation):
  x = logits.astype(jnp.float32)
  if activation == 'softmax':
    x = jax.nn.softmax(x, axis=-1)
  elif activation == 'sigmoid':
    x = jax.nn.sigmoid(x)
  return jnp.take_along_axis(x, targets[:, None], axis=1)[:, 0]


def _stencil(x: jax.Array) -> jax.Array:
  """``sum_j w_j x[p + offset_j]`` with zero outside the image; ``x [B, H, W, C]``."""
  p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  out = jnp.zeros_like(x)
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      if dy == dx == 0:
        continue
      wgt = _DIRECT if dy == 0 or dx == 0 else _DIAGONAL
      out = out + wgt * p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
  return out


def linear_impute(images: jax.Array, keep: jax.Array, *, maxiter: int = 2000) -> jax.Array:
  """The noise-free linear imputation of the removed pixels (``keep == 0``).

  Every removed pixel ``i`` satisfies ``s_i x_i = sum_j w_ij x_j`` over its in-image neighbours
  (``s_i`` = the sum of their weights); kept pixels are fixed. The system on the removed pixels
  is symmetric positive definite, solved by conjugate gradients (float32, ``tol=1e-7``).

  Args: images float ``[B, H, W, C]``; keep ``[B, H, W]`` (1 keep, 0 impute).
  Returns: float32 ``[B, H, W, C]``.
  """
  x = images.astype(jnp.float32)
  free = (1.0 - keep.astype(jnp.float32))[..., None]  # [B, H, W, 1]
  s = _stencil(jnp.ones_like(x[..., :1]))  # in-image neighbour weight per pixel

  def op(u):  # restricted to the removed pixels
    u = u * free
    return (s * u - _stencil(u)) * free

  rhs = _stencil(x * (1.0 - free)) * free
  u, _ = cg(op, rhs, x0=jnp.zeros_like(rhs), tol=1e-7, maxiter=maxiter)
  return x * (1.0 - free) + u * free


def otsu_threshold(values: jax.Array) -> jax.Array:
  """OpenCV's Otsu threshold (``cv2.THRESH_OTSU``) of 8-bit images, batched.

  The level ``t`` in 0..255 that maximises the between-class variance ``q1 q2 (mu1 - mu2)^2``
  of the classes ``<= t`` and ``> t``, the first one on ties, levels with a class weight below
  FLT_EPSILON skipped (0 when every level is: a constant image), as OpenCV's
  ``getThreshVal_Otsu_8u``.

  Args: values uint8 ``[B, N]``. Returns int32 ``[B]``.
  """
  hist = jax.vmap(lambda v: jnp.bincount(v.astype(jnp.int32), length=256))(values)
  p = hist.astype(jnp.float32) / values.shape[1]
  levels = jnp.arange(256, dtype=jnp.float32)
  q1 = jnp.cumsum(p, axis=1)
  m1 = jnp.cumsum(p * levels, axis=1)
  q2 = 1.0 - q1
  mu = m1[:, -1:]
  eps = jnp.finfo(jnp.float32).eps
  valid = (jnp.minimum(q1, q2) >= eps) & (jnp.maximum(q1, q2) <= 1.0 - eps)
  mu1 = m1 / jnp.where(valid, q1, 1.0)
  mu2 = (mu - m1) / jnp.where(valid, q2, 1.0)
  sigma = jnp.where(valid, q1 * q2 * (mu1 - mu2) ** 2, -1.0)
  best = jnp.argmax(sigma, axis=1).astype(jnp.int32)  # the first maximum
  return jnp.where(jnp.any(valid, axis=1), best, 0)


def removal_mask(maps: jax.Array, percentile, order: str) -> jax.Array:
  """``keep [B, H, W]``: 1 where ``m < percentile(m)``, with ``m = map`` (MoRF) or ``1 - map``
  (LeRF), ``np.percentile``'s linear rule, as the package's ``RemoveMostRelevantFirst``.

  ``percentile='auto'``: the package's Otsu rule, ``keep = uint8(m * 255) > otsu`` (OpenCV's
  THRESH_BINARY + THRESH_OTSU). As in the package this keeps the pixels *above* the threshold,
  the opposite side of the percentile rule (MoRF with 'auto' removes the least relevant ones).
  """
  m = maps.astype(jnp.float32) if order == 'morf' else 1.0 - maps.astype(jnp.float32)
  if percentile == 'auto':
    u8 = (m * 255.0).astype(jnp.uint8)  # np.uint8(mask * 255): truncation, as the package
    th = otsu_threshold(u8.reshape(u8.shape[0], -1))
    return (u8.astype(jnp.int32) > th[:, None, None]).astype(jnp.float32)
  th = jnp.percentile(m.reshape(m.shape[0], -1), percentile, axis=1)
  return (m < th[:, None, None]).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=('forward', 'activation'))
def _cam_mult(state, images, maps, targets, *, forward, activation):
  b = images.shape[0]
  logits = forward(state, jnp.concatenate([images, images * maps[..., None]], axis=0))
  s = _score(logits, jnp.concatenate([targets, targets]), activation)
  return s[b:] - s[:b]


@functools.partial(
  jax.jit, static_argnames=('forward', 'activation', 'percentiles', 'order', 'noise')
)
def _road(state, images, maps, targets, key, *, forward, activation, percentiles, order, noise):
  base = _score(forward(state, images), targets, activation)
  out = []
  for i, p in enumerate(percentiles):
    keep = removal_mask(maps, p, order)
    x = linear_impute(images, keep)
    if noise:
      eps = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
      x = x + noise * eps * (1.0 - keep)[..., None]
    out.append(_score(forward(state, x.astype(images.dtype)), targets, activation) - base)
  return jnp.stack(out, axis=1)  # [B, P]


def _prepare(model, variables, images, maps, targets, activation, logits_fn, call_kwargs):
  if activation not in ACTIVATIONS:
    raise ValueError(f'unknown activation {activation!r}; valid: {ACTIVATIONS}')
  if getattr(images, 'ndim', None) != 4 or tuple(maps.shape) != tuple(images.shape[:3]):
    raise ValueError(
      f'images must be [B, H, W, C] and maps [B, H, W]; got {images.shape}, {maps.shape}'
    )
  targets = jnp.asarray(targets, jnp.int32)
  if targets.shape != images.shape[:1]:
    raise ValueError(f'targets must be [B], got shape {targets.shape}')
  forward, state = model_forward(model, variables, logits_fn=logits_fn, call_kwargs=call_kwargs)
  return forward, state, targets


def cam_mult_image_confidence_change(
  model, variables, images, maps, targets, *, activation='logit', logits_fn=None, **call_kwargs
):
  """``score(image * map) - score(image)`` per image (the package's
  ``CamMultImageConfidenceChange``). Args: as ``explain`` for the model; images
  ``[B, H, W, C]``, maps ``[B, H, W]``, targets int ``[B]``. Returns float32 ``[B]``."""
  forward, state, targets = _prepare(
    model, variables, images, maps, targets, activation, logits_fn, call_kwargs
  )
  return _cam_mult(state, images, maps, targets, forward=forward, activation=activation)


def road(
  model,
  variables,
  images,
  maps,
  targets,
  *,
  order: str = 'morf',
  percentiles=(80,),
  noise: float = 0.01,
  seed: int = 0,
  activation: str = 'logit',
  logits_fn=None,
  **call_kwargs,
):
  """ROAD per image and percentile: ``score(imputed) - score(image)``.

  Args:
    order: ``'morf'`` (remove the most relevant first; lower is better) or ``'lerf'``.
    percentiles: numbers in [0, 100] or ``'auto'`` (Otsu's threshold, see ``removal_mask``);
      the package's defaults are 80 (MoRF) and 20 (LeRF) for one threshold.
    noise: std of the Gaussian noise added to the imputed pixels (the package's 0.01).
  Returns:
    float32 ``[B, len(percentiles)]``.
  """
  if order not in ORDERS:
    raise ValueError(f'unknown order {order!r}; valid: {ORDERS}')
  if isinstance(percentiles, str | int | float):
    percentiles = (percentiles,)
  if not all(p == 'auto' or (not isinstance(p, str) and 0 <= float(p) <= 100) for p in percentiles):
    raise ValueError(f"percentiles must be numbers in [0, 100] or 'auto', got {percentiles!r}")
  forward, state, targets = _prepare(
    model, variables, images, maps, targets, activation, logits_fn, call_kwargs
  )
  return _road(
    state,
    images,
    maps,
    targets,
    jax.random.key(seed),
    forward=forward,
    activation=activation,
    percentiles=tuple(p if p == 'auto' else float(p) for p in percentiles),
    order=order,
    noise=float(noise),
  )


def road_combined(
  model, variables, images, maps, targets, *, percentiles=DEFAULT_PERCENTILES, **kwargs
):
  """The package's ``ROADCombined``: ``(mean LeRF - mean MoRF) / 2`` over ``percentiles``,
  float32 ``[B]`` (higher is better)."""
  common = dict(percentiles=percentiles, **kwargs)
  lerf = road(model, variables, images, maps, targets, order='lerf', **common)
  morf = road(model, variables, images, maps, targets, order='morf', **common)
  return (lerf.mean(axis=1) - morf.mean(axis=1)) / 2.0
