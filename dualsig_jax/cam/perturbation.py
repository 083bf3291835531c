"""ScoreCAM and AblationCAM channel weights: many masked forwards, batched on device.

Both need one forward per (image, channel). The ``B * C`` forwards are cut into chunks of
``batch_size`` and run by ``jax.lax.map`` inside the caller's jit, so the masked inputs are built
on device chunk by chunk (never all ``B * C`` at once). The last chunk is padded with repeated
indices whose scores are dropped. Formulas as pytorch-grad-cam 1.5.7's ``ScoreCAM`` and
``AblationCAM`` (with its default ``AblationLayer`` and ``ratio_channels_to_ablate=1.0``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dualsig_jax.cam.layer_methods import upsample_channels

_ABLATION_VALUE = 1e7  # AblationLayer: below the minimum when the layer has no zeros


def chunked_scores(score_fn: Callable, n: int, batch_size: int) -> jax.Array:
  """``score_fn(idx int32 [batch_size]) -> [batch_size]`` over ``0..n-1`` in chunks; ``[n]``."""
  bs = max(1, min(int(batch_size), n))
  chunks = -(-n // bs)
  idx = (jnp.arange(chunks * bs, dtype=jnp.int32) % n).reshape(chunks, bs)
  return jax.lax.map(score_fn, idx).reshape(-1)[:n]


def _target_score(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.take_along_axis(logits.astype(jnp.float32), targets[:, None], axis=1)[:, 0]


def scorecam_weights(
  forward: Callable,
  images: jax.Array,
  acts: jax.Array,
  targets: jax.Array,
  batch_size: int,
) -> jax.Array:
  """ScoreCAM (Wang et al. 2020) weights: softmax over channels of the target logit of
  ``image * mask_c``, ``mask_c`` = channel ``c`` upsampled (bilinear, corners aligned) to the
  image and min-max normalized.

  Args:
    forward: ``images [N, H, W, 3] -> logits [N, K]`` (a plain forward of the model).
    images: float ``[B, H, W, 3]``; acts float ``[B, h, w, C]``; targets int32 ``[B]``.
    batch_size: masked images per forward.
  Returns:
    float32 ``[B, C]``.
  """
  b, _, _, c = acts.shape
  size = images.shape[1:3]

  def score(idx):
    bi, ci = idx // c, idx % c
    maps = jnp.moveaxis(acts[bi], -1, 1)[jnp.arange(idx.shape[0]), ci]  # [n, h, w]
    masked = images[bi] * upsample_channels(maps, size)[..., None].astype(images.dtype)
    return _target_score(forward(masked), targets[bi])

  scores = chunked_scores(score, b * c, batch_size).reshape(b, c)
  return jax.nn.softmax(scores, axis=-1)


def ablation_weights(
  forward_edit: Callable,
  images: jax.Array,
  raw_acts: jax.Array,
  logits: jax.Array,
  targets: jax.Array,
  batch_size: int,
) -> jax.Array:
  """AblationCAM (Desai & Ramaswamy 2020) weights ``(y - y_c) / y``: ``y`` the target logit,
  ``y_c`` the same with channel ``c`` of the target layer's output ablated (set to 0 when that
  image's output has a zero, else to its minimum minus 1e7, as ``AblationLayer``).

  The channel is the last axis of the layer's own output (``[B, h, w, C]`` or tokens
  ``[B, N, C]``). The package lowers the value once more for each channel already ablated in a
  batch when the output has no zero; here every ablation uses ``min - 1e7`` (identical for
  layers after a ReLU, which have zeros).

  Args:
    forward_edit: ``(images [N, ...], edit) -> logits [N, K]``, ``edit`` replacing the layer
      output.
    images: float ``[B, H, W, 3]``; raw_acts: the layer output ``[B, ..., C]``;
      logits ``[B, K]`` of the unablated forward; targets int32 ``[B]``.
    batch_size: ablated copies per forward.
  Returns:
    float32 ``[B, C]``.
  """
  b, c = raw_acts.shape[0], raw_acts.shape[-1]
  lo = jnp.min(raw_acts.reshape(b, -1), axis=1)
  value = jnp.where(lo == 0, 0.0, lo - _ABLATION_VALUE).astype(raw_acts.dtype)

  def score(idx):
    bi, ci = idx // c, idx % c
    hit = jax.nn.one_hot(ci, c, dtype=jnp.bool_)  # [n, C]
    hit = hit.reshape((idx.shape[0],) + (1,) * (raw_acts.ndim - 2) + (c,))
    vals = value[bi].reshape((-1,) + (1,) * (raw_acts.ndim - 1))
    ablated = jnp.where(hit, vals, raw_acts[bi])
    return _target_score(forward_edit(images[bi], lambda _: ablated), targets[bi])

  ablated_scores = chunked_scores(score, b * c, batch_size).reshape(b, c)
  y = _target_score(logits, targets)[:, None]
  return (y - ablated_scores) / y
