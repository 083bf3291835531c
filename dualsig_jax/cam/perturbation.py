"""ScoreCAM and AblationCAM channel weights: many masked forwards, batched on device.

Both need one forward per (image, channel). The ``B * C`` forwards are cut into chunks of
``batch_size`` and run by ``jax.lax.scan`` inside the caller's jit, so the masked inputs are built
on device chunk by chunk (never all ``B * C`` at once). The last chunk is padded with repeated
indices whose scores are dropped. The model's state rides in the scan's carry, an argument of
the loop body, never a value closed over from the outer trace (an NNX model rebuilt from
closed-over values fails inside its own ``nnx.scan``). Formulas as pytorch-grad-cam 1.5.7's ``ScoreCAM`` and
``AblationCAM`` (with its default ``AblationLayer`` and ``ratio_channels_to_ablate=1.0``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dualsig_jax.cam.layer_methods import upsample_channels
from dualsig_jax.cam.methods import at_least_f32

_ABLATION_VALUE = 1e7  # AblationLayer: below the minimum when the layer has no zeros


def chunked_scores(score_fn: Callable, n: int, batch_size: int, state=None) -> jax.Array:
  """``score_fn(state, idx int32 [batch_size]) -> [batch_size]`` over ``0..n-1`` in chunks;
  returns ``[n]``."""
  bs = max(1, min(int(batch_size), n))
  chunks = -(-n // bs)
  idx = (jnp.arange(chunks * bs, dtype=jnp.int32) % n).reshape(chunks, bs)
  _, scores = jax.lax.scan(lambda s, i: (s, score_fn(s, i)), state, idx)
  return scores.reshape(-1)[:n]


def scorecam_weights(
  forward: Callable,
  state,
  images: jax.Array,
  acts: jax.Array,
  score: Callable,
  batch_size: int,
) -> jax.Array:
  """ScoreCAM (Wang et al. 2020) weights: softmax over channels of the target logit of
  ``image * mask_c``, ``mask_c`` = channel ``c`` upsampled (bilinear, corners aligned) to the
  image and min-max normalized.

  Args:
    forward: ``(state, images [N, H, W, 3]) -> output [N, ...]`` (a plain forward).
    state: the model's state, handed to ``forward``.
    images: float ``[B, H, W, 3]``; acts float ``[B, h, w, C]``.
    score: ``(output [N, ...], rows int32 [N]) -> [N]``: the target score of copies of images
      ``rows``.
    batch_size: masked images per forward.
  Returns:
    float32 ``[B, C]``.
  """
  b, _, _, c = acts.shape
  size = images.shape[1:3]

  def chunk(s, idx):
    bi, ci = idx // c, idx % c
    maps = jnp.moveaxis(acts[bi], -1, 1)[jnp.arange(idx.shape[0]), ci]  # [n, h, w]
    masked = images[bi] * upsample_channels(maps, size)[..., None].astype(images.dtype)
    return score(forward(s, masked), bi)

  scores = chunked_scores(chunk, b * c, batch_size, state).reshape(b, c)
  return jax.nn.softmax(scores, axis=-1)


def ablation_weights(
  forward_edit: Callable,
  state,
  images: jax.Array,
  raw_acts: jax.Array,
  y: jax.Array,
  score: Callable,
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
    forward_edit: ``(state, images [N, ...], edit) -> output [N, ...]``, ``edit`` replacing the
      layer output.
    state: the model's state, handed to ``forward_edit``.
    images: float ``[B, H, W, 3]``; raw_acts: the layer output ``[B, ..., C]``;
      y: float32 ``[B]`` target scores of the unablated forward.
    score: ``(output [N, ...], rows int32 [N]) -> [N]`` as in ``scorecam_weights``.
    batch_size: ablated copies per forward.
  Returns:
    float32 ``[B, C]``.
  """
  b, c = raw_acts.shape[0], raw_acts.shape[-1]
  lo = jnp.min(raw_acts.reshape(b, -1), axis=1)
  value = jnp.where(lo == 0, 0.0, lo - _ABLATION_VALUE).astype(raw_acts.dtype)

  def chunk(s, idx):
    bi, ci = idx // c, idx % c
    hit = jax.nn.one_hot(ci, c, dtype=jnp.bool_)  # [n, C]
    hit = hit.reshape((idx.shape[0],) + (1,) * (raw_acts.ndim - 2) + (c,))
    vals = value[bi].reshape((-1,) + (1,) * (raw_acts.ndim - 1))
    ablated = jnp.where(hit, vals, raw_acts[bi])
    return score(forward_edit(s, images[bi], lambda _: ablated), bi)

  ablated_scores = chunked_scores(chunk, b * c, batch_size, state).reshape(b, c)
  y = at_least_f32(y)[:, None]
  return (y - ablated_scores) / y
