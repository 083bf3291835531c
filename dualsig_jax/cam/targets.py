"""What a CAM explains: a class index per image, or any JAX function ``output -> [B]`` score.

``cam.explain(..., targets=...)`` takes

* ``None``: each image's argmax class (the output must be logits ``[B, K]``);
* int ``[B]``: a class per image;
* ``'all'`` / ``('topk', k)``: every class / each image's ``k`` highest classes, maps
  ``[B, K, H, W]`` / ``[B, k, H, W]``;
* a function ``output -> [B]``: the score whose gradient (or masked-input change) drives the map.
  It sees the model's output after ``logits_fn`` (any shape, e.g. ``[B, H, W, K]`` for a
  segmentation model) and must score each row from that row alone, whatever the number of rows:
  ScoreCAM and AblationCAM call it on batches of masked copies. A pytree callable (the targets
  below, ``functools.partial``) may carry per-image arrays, leading axis ``B``: those rows are
  picked with the copies.

The targets below mirror pytorch-grad-cam 1.5.7's ``utils.model_targets``; each is a pytree, so
their arrays are traced arguments (a new mask does not recompile).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dualsig_jax.cam.methods import at_least_f32
from dualsig_jax.cam.target_layer import Static


def _per_image(category: jax.Array, b: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(category, jnp.int32), (b,))


@struct.dataclass
class ClassifierOutputTarget:
  """The logit of ``category`` (int, or int ``[B]``): ``out [B, K] -> out[b, category[b]]``."""

  category: jax.Array

  def __call__(self, out: jax.Array) -> jax.Array:
    cat = _per_image(self.category, out.shape[0])
    return jnp.take_along_axis(out, cat[:, None], axis=-1)[:, 0]

  def validate(self, shape: tuple) -> None:
    """Host-side check against the output's shape ``[B, K]``."""
    _check_2d(self, shape)
    check_categories(self.category, shape[-1], shape[0], 'category')


@struct.dataclass
class ClassifierOutputSoftmaxTarget:
  """The softmax probability of ``category``: ``softmax(out [B, K])[b, category[b]]``."""

  category: jax.Array

  def __call__(self, out: jax.Array) -> jax.Array:
    cat = _per_image(self.category, out.shape[0])
    return jnp.take_along_axis(jax.nn.softmax(out, axis=-1), cat[:, None], axis=-1)[:, 0]

  def validate(self, shape: tuple) -> None:
    """Host-side check against the output's shape ``[B, K]``."""
    _check_2d(self, shape)
    check_categories(self.category, shape[-1], shape[0], 'category')


@struct.dataclass
class BinaryClassifierOutputTarget:
  """One-logit classifier (``out [B]`` or ``[B, 1]``): the logit for category 1, its negation
  for category 0 (int, or int ``[B]``)."""

  category: jax.Array

  def __call__(self, out: jax.Array) -> jax.Array:
    logit = out.reshape(out.shape[0], -1)[:, 0]
    return jnp.where(_per_image(self.category, out.shape[0]) == 1, logit, -logit)

  def validate(self, shape: tuple) -> None:
    """Host-side check: one logit per image, category 0 or 1."""
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
      raise ValueError(f'BinaryClassifierOutputTarget needs a [B] or [B, 1] output, got {shape}')
    check_categories(self.category, 2, shape[0], 'category')


@struct.dataclass
class RawScoresOutputTarget:
  """The sum of the whole output of each image (any shape ``[B, ...]``)."""

  def __call__(self, out: jax.Array) -> jax.Array:
    return jnp.sum(out.reshape(out.shape[0], -1), axis=-1)


@struct.dataclass
class SemanticSegmentationTarget:
  """Segmentation: the ``category`` channel of ``out [B, H, W, K]`` summed over ``mask``
  (float ``[B, H, W]`` or ``[H, W]``, e.g. the predicted pixels of that class)."""

  category: jax.Array
  mask: jax.Array

  def __call__(self, out: jax.Array) -> jax.Array:
    if out.ndim != 4:
      raise ValueError(
        f'SemanticSegmentationTarget needs a [B, H, W, K] output, got shape {out.shape}'
      )
    cat = _per_image(self.category, out.shape[0])
    chan = jnp.take_along_axis(out, cat[:, None, None, None], axis=-1)[..., 0]
    return jnp.sum(chan * self.mask, axis=(1, 2))

  def validate(self, shape: tuple) -> None:
    """Host-side check against the output's shape ``[B, H, W, K]``."""
    if len(shape) != 4:
      raise ValueError(f'SemanticSegmentationTarget needs a [B, H, W, K] output, got {shape}')
    check_categories(self.category, shape[-1], shape[0], 'category')
    mask = np.shape(self.mask)
    if mask not in (tuple(shape[:3]), tuple(shape[1:3])):
      raise ValueError(f'mask must be [B, H, W]={tuple(shape[:3])} or [H, W], got {mask}')


def _check_2d(target, shape: tuple) -> None:
  if len(shape) != 2:
    raise ValueError(f'{type(target).__name__} needs logits [B, K], got an output of shape {shape}')


SHIPPED = (
  ClassifierOutputTarget,
  ClassifierOutputSoftmaxTarget,
  BinaryClassifierOutputTarget,
  RawScoresOutputTarget,
  SemanticSegmentationTarget,
)


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def split_target(fn):
  """Split a target function into its array leaves (traced) and the rest (compile-time).

  Returns ``(arrays list, static)``; ``join_target(arrays, static)`` rebuilds the function.
  """
  leaves, treedef = jax.tree.flatten(fn)
  arrays = [jnp.asarray(x) if _is_array(x) else None for x in leaves]
  static = tuple(None if _is_array(x) else Static(x) for x in leaves)
  return arrays, (treedef, static)


def join_target(arrays, static):
  treedef, rest = static
  leaves = [a if s is None else s.value for a, s in zip(arrays, rest)]
  return jax.tree.unflatten(treedef, leaves)


def rows_of(arrays, rows: jax.Array, b: int):
  """The target's per-image arrays (leading axis ``b``) at ``rows``; others unchanged."""
  return [a[rows] if a is not None and a.ndim >= 1 and a.shape[0] == b else a for a in arrays]


def check_scores(scores, b: int) -> jax.Array:
  """The target function's result must be one score per image, ``[B]``."""
  if not hasattr(scores, 'shape') or tuple(scores.shape) != (b,):
    got = getattr(scores, 'shape', type(scores).__name__)
    raise ValueError(f'a target function must return one score per image, [B]={b}; got {got}')
  return at_least_f32(scores)


def check_categories(category, k: int | None, b: int, what: str) -> None:
  """Host-side check of class indices: integers in ``[0, k)``, scalar or ``[b]``."""
  if isinstance(category, jax.core.Tracer):
    return  # inside the caller's jit: values are not known here
  arr = np.asarray(category)
  if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(
      f'{what} must be integer class indices, got dtype {arr.dtype}: pass e.g. '
      'jnp.asarray(t, jnp.int32) (floats are not truncated silently)'
    )
  if arr.ndim not in (0, 1) or (arr.ndim == 1 and arr.shape[0] != b):
    raise ValueError(f'{what} must be one int or int [B]={b}, got shape {arr.shape}')
  if k is not None and arr.size and (arr.min() < 0 or arr.max() >= k):
    bad = arr[(arr < 0) | (arr >= k)].ravel()[:5].tolist()
    raise ValueError(f'{what} {bad} out of range: the output has {k} classes (0..{k - 1})')
