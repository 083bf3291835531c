"""Explanation fidelity of score maps: Average Drop, Increase in Confidence, insertion/deletion.

Average Drop and Increase in Confidence follow Chattopadhyay et al. (Grad-CAM++, WACV 2018) as
the paper's Table 1 uses them: ``Y_c`` is the model's confidence for class ``c`` on the image,
``O_c`` on the image multiplied by its normalized map (pytorch-grad-cam's
``multiply_tensor_with_cam``: the *normalized* input tensor times the map);
``drop = max(0, Y_c - O_c) / (Y_c + 1e-7)`` (the eps is the reference's ``ConfidenceChange``) and
``increase = [Y_c < O_c]``. Both are reported in %.

Insertion/deletion (Petsiuk et al., RISE, BMVC 2018) are extras: pixels are added to a baseline
(insertion) or replaced by it (deletion) in decreasing map order, and the area under the
target-confidence curve is reported.

Confidence = ``activation(out[logits_key])[c]``; default the softmax probability of the softmax
head (``logits_key='softmax_logits', activation='softmax'``); ``activation='sigmoid'`` with
``logits_key='sigmoid_logits'`` gives the sigmoid head's own probability.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = ('softmax', 'sigmoid')
_DROP_EPS = 1e-7


def _confidence(out: dict, targets: jax.Array, logits_key: str, activation: str) -> jax.Array:
  if logits_key not in out:
    raise ValueError(f'apply_fn output lacks {logits_key!r}; it has {sorted(out)}')
  logits = out[logits_key].astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1) if activation == 'softmax' else jax.nn.sigmoid(logits)
  return jnp.take_along_axis(probs, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]


def _check(activation: str, images, maps, targets):
  if activation not in ACTIVATIONS:
    raise ValueError(f'unknown activation {activation!r}; valid: {ACTIVATIONS}')
  if images.ndim != 4 or maps.shape != images.shape[:3]:
    raise ValueError(
      f'images must be [B, H, W, C] and maps [B, H, W]; got {images.shape}, {maps.shape}'
    )
  if jnp.shape(targets) != images.shape[:1]:
    raise ValueError(f'targets must be [B], got shape {jnp.shape(targets)}')


@functools.partial(jax.jit, static_argnames=('apply_fn', 'logits_key', 'activation'))
def _confidence_change(variables, images, maps, targets, *, apply_fn, logits_key, activation):
  b = images.shape[0]
  masked = images * maps[..., None].astype(images.dtype)
  # One forward over [image; image * map]: the model is in inference mode, so the halves do
  # not interact, and one call halves dispatch.
  out = apply_fn(variables, jnp.concatenate([images, masked], axis=0))
  conf = _confidence(out, jnp.concatenate([targets, targets]), logits_key, activation)
  y, o = conf[:b], conf[b:]
  return {
    'y': y,
    'o': o,
    'drop': jnp.maximum(y - o, 0.0) / (y + _DROP_EPS),
    'increase': (o > y).astype(jnp.float32),
  }


def confidence_change(
  apply_fn: Callable,
  variables,
  images: jax.Array,
  maps: jax.Array,
  targets: jax.Array,
  *,
  logits_key: str = 'softmax_logits',
  activation: str = 'softmax',
) -> dict:
  """Per-image confidences and their change under ``image * map`` (jitted, batched).

  Args:
    apply_fn: ``(variables, images) -> dict`` of logits (``logits_key`` must be present).
    variables: model variables.
    images: float32 ``[B, H, W, C]`` normalized inputs.
    maps: float ``[B, H, W]`` in [0, 1].
    targets: int ``[B]`` class per image.
    logits_key, activation: which confidence (see the module docstring).
  Returns:
    dict of float32 ``[B]``: ``y`` (Y_c), ``o`` (O_c), ``drop`` (fraction, not %), ``increase``
    (0/1). Accumulate over batches and average (see ``average_drop``).
  """
  targets = jnp.asarray(targets, jnp.int32)
  _check(activation, images, maps, targets)
  return _confidence_change(
    variables,
    images,
    maps,
    targets,
    apply_fn=apply_fn,
    logits_key=logits_key,
    activation=activation,
  )


def _masked_mean_pct(x: jax.Array, valid: jax.Array | None) -> jax.Array:
  if valid is None:
    return 100.0 * jnp.mean(x)
  v = jnp.asarray(valid, jnp.float32)
  return 100.0 * jnp.sum(x * v) / jnp.maximum(jnp.sum(v), 1.0)


def average_drop(
  apply_fn: Callable,
  variables,
  images,
  maps,
  targets,
  *,
  valid=None,
  logits_key: str = 'softmax_logits',
  activation: str = 'softmax',
) -> jax.Array:
  """Average Drop % = mean over (valid) images of ``max(0, Y_c - O_c) / Y_c * 100``.

  Args as ``confidence_change``; ``valid`` optional bool ``[B]`` (False on padding).
  Returns: float32 scalar (lower is better).
  """
  r = confidence_change(
    apply_fn, variables, images, maps, targets, logits_key=logits_key, activation=activation
  )
  return _masked_mean_pct(r['drop'], valid)


def increase_in_confidence(
  apply_fn: Callable,
  variables,
  images,
  maps,
  targets,
  *,
  valid=None,
  logits_key: str = 'softmax_logits',
  activation: str = 'softmax',
) -> jax.Array:
  """Increase in Confidence % = mean over (valid) images of ``[Y_c < O_c] * 100``.

  Args as ``average_drop``. Returns: float32 scalar (higher is better).
  """
  r = confidence_change(
    apply_fn, variables, images, maps, targets, logits_key=logits_key, activation=activation
  )
  return _masked_mean_pct(r['increase'], valid)


class FidelityAccumulator:
  """Streaming Average Drop and Increase in Confidence over batches (and processes).

  Keeps each valid image's drop (the float32 value ``confidence_change`` returned) and the
  number of images whose confidence increased. The drops are summed with ``math.fsum`` (the
  correctly rounded sum, independent of order), so the result is the same however the images
  were split into batches, devices or processes.
  """

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    """Forgets every accumulated image."""
    self._drops: list[np.ndarray] = []
    self.num_increase = 0
    self.num_images = 0

  def accumulate(self, change: dict, valid=None) -> None:
    """Adds a batch.

    Args:
      change: ``confidence_change`` output (at least ``drop`` and ``increase``, float ``[B]``).
      valid: optional bool ``[B]``; False rows (padding) are ignored.
    """
    drop = np.asarray(change['drop'], np.float32).reshape(-1)
    inc = np.asarray(change['increase']).reshape(-1)
    valid = np.ones(drop.shape, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    if not drop.shape == inc.shape == valid.shape:
      raise ValueError(
        f'drop, increase and valid must all be [B]; got {drop.shape}, {inc.shape}, {valid.shape}'
      )
    self._drops.append(drop[valid])
    self.num_increase += int(np.count_nonzero(inc[valid] > 0.5))
    self.num_images += int(valid.sum())

  @property
  def drops(self) -> np.ndarray:
    """float32 ``[N]``: the drop (fraction) of every accumulated image, in arrival order."""
    if len(self._drops) != 1:
      self._drops = [np.concatenate(self._drops) if self._drops else np.zeros(0, np.float32)]
    return self._drops[0]

  def state(self) -> dict:
    """What ``merge`` needs: ``drops`` float32 ``[N]``, ``num_increase``, ``num_images``."""
    return {'drops': self.drops, 'num_increase': self.num_increase, 'num_images': self.num_images}

  def merge(self, state: dict) -> None:
    """Adds another accumulator's ``state()`` (e.g. another process's images)."""
    drops = np.asarray(state['drops'], np.float32).reshape(-1)
    if len(drops) != int(state['num_images']):
      raise ValueError(f'state has {len(drops)} drops for {state["num_images"]} images')
    self._drops.append(drops)
    self.num_increase += int(state['num_increase'])
    self.num_images += int(state['num_images'])

  def compute(self) -> dict:
    """``{'avg_drop': %, 'inc_conf': %}`` over all accumulated images."""
    if self.num_images == 0:
      raise ValueError('FidelityAccumulator.compute() called before any image was accumulated')
    total = math.fsum(self.drops.astype(np.float64).tolist())
    return {
      'avg_drop': 100.0 * total / self.num_images,
      'inc_conf': 100.0 * self.num_increase / self.num_images,
    }


@functools.partial(jax.jit, static_argnames=('apply_fn', 'num_steps', 'logits_key', 'activation'))
def _insertion_deletion(
  variables, images, maps, targets, baseline, *, apply_fn, num_steps, logits_key, activation
):
  b, h, w, _ = images.shape
  n = h * w
  flat = maps.reshape(b, n)
  # rank[p] = position of pixel p in decreasing-map order (stable: ties keep raster order).
  order = jnp.argsort(-flat, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1).reshape(b, h, w, 1)

  def step(k):
    top = rank < (k * n) // num_steps  # the k/num_steps most salient pixels
    deleted = jnp.where(top, baseline, images)
    inserted = jnp.where(top, images, baseline)
    out = apply_fn(variables, jnp.concatenate([deleted, inserted], axis=0))
    c = _confidence(out, jnp.concatenate([targets, targets]), logits_key, activation)
    return c[:b], c[b:]

  dele, ins = jax.lax.map(step, jnp.arange(num_steps + 1))  # [S+1, B] each
  dele, ins = dele.T, ins.T

  def auc(curve):  # trapezoid over x in [0, 1] with step 1/S
    return (jnp.sum(curve, -1) - 0.5 * (curve[:, 0] + curve[:, -1])) / num_steps

  return {
    'deletion': auc(dele),
    'insertion': auc(ins),
    'deletion_curve': dele,
    'insertion_curve': ins,
  }


def insertion_deletion(
  apply_fn: Callable,
  variables,
  images: jax.Array,
  maps: jax.Array,
  targets: jax.Array,
  *,
  num_steps: int = 20,
  baseline: jax.Array | None = None,
  logits_key: str = 'softmax_logits',
  activation: str = 'softmax',
) -> dict:
  """Insertion and deletion AUC (higher insertion / lower deletion is better), jitted.

  Args:
    apply_fn, variables, images ``[B, H, W, C]``, maps ``[B, H, W]``, targets ``[B]``: as
      ``confidence_change``.
    num_steps: curve points minus one; step k perturbs ``floor(k * H * W / num_steps)`` pixels.
      Costs ``num_steps + 1`` forwards of ``2B`` images.
    baseline: float ``[B, H, W, C]`` (or broadcastable) values for removed pixels; default
      zeros, i.e. the dataset mean colour for mean/std-normalized inputs.
  Returns:
    dict: ``insertion``, ``deletion`` float32 ``[B]``; ``insertion_curve``, ``deletion_curve``
    float32 ``[B, num_steps + 1]``.
  """
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  targets = jnp.asarray(targets, jnp.int32)
  _check(activation, images, maps, targets)
  base = (
    jnp.zeros_like(images)
    if baseline is None
    else jnp.broadcast_to(jnp.asarray(baseline, images.dtype), images.shape)
  )
  return _insertion_deletion(
    variables,
    images,
    maps,
    targets,
    base,
    apply_fn=apply_fn,
    num_steps=int(num_steps),
    logits_key=logits_key,
    activation=activation,
  )
