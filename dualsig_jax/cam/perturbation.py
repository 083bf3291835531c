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


def _masked_scores(forward, images, acts, score) -> Callable:
  """``(state, idx int32 [n])`` (``idx = image * C + channel``) -> the target score of each
  masked image, at least float32."""
  c = acts.shape[-1]
  size = images.shape[1:3]

  def run(s, idx):
    bi, ci = idx // c, idx % c
    maps = jnp.moveaxis(acts[bi], -1, 1)[jnp.arange(idx.shape[0]), ci]  # [n, h, w]
    masked = images[bi] * upsample_channels(maps, size)[..., None].astype(images.dtype)
    return at_least_f32(score(forward(s, masked), bi))

  return run


def scorecam_plan(acts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Which ScoreCAM forwards are the same forward: ``(rep int32 [B, C], constant bool [B, C])``.

  ``constant``: the channel's map is constant, so its normalized mask is 0 and the masked image
  is all zeros, the same input for every channel and image. ``rep[b, c]``: the first channel of
  image ``b`` whose map is bitwise identical to channel ``c``'s (``c`` itself when none is):
  the same mask of the same image, hence the same score. Found by an order-free integer hash of
  the maps' bits (sorted per image), each match then checked element by element, so a hash
  collision only loses a saving, never merges two different maps.

  Args: acts float ``[B, h, w, C]``.
  """
  b, h, w, c = acts.shape
  maps = jnp.moveaxis(acts, -1, 1).reshape(b, c, h * w)
  constant = jnp.max(maps, axis=-1) == jnp.min(maps, axis=-1)
  bits = jax.lax.bitcast_convert_type(maps.astype(jnp.float32), jnp.uint32)
  # Odd multipliers per position: sums of products wrap mod 2^32 whatever the summation order.
  mult = jnp.arange(h * w, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
  key = jnp.sum(bits * mult, axis=-1, dtype=jnp.uint32)  # [B, C]
  order = jnp.argsort(key, axis=1, stable=True)
  sorted_key = jnp.take_along_axis(key, order, axis=1)
  starts = jnp.concatenate(
    [jnp.ones((b, 1), jnp.bool_), sorted_key[:, 1:] != sorted_key[:, :-1]], axis=1
  )
  run_start = jax.lax.cummax(jnp.where(starts, jnp.arange(c), 0), axis=1)
  rep_sorted = jnp.take_along_axis(order, run_start, axis=1)  # stable: the smallest index
  rep = jnp.zeros((b, c), jnp.int32).at[jnp.arange(b)[:, None], order].set(rep_sorted)
  same = jnp.all(jnp.take_along_axis(maps, rep[..., None], axis=1) == maps, axis=-1)
  rep = jnp.where(same, rep, jnp.arange(c, dtype=jnp.int32))
  return rep, constant


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

  Only distinct masked images are run (``scorecam_plan``): a constant channel's masked image is
  zeros (one forward for all of them, every image), a channel identical to an earlier one of
  the same image takes its score. The chunks of the rest run in order; chunks past the last
  distinct image are skipped (``lax.cond``, so the count of forwards follows the data while the
  shapes stay static). A constant channel scores exactly the zero image here; the package
  computes its mask as ``(x - min) / (max - min + 1e-8)`` after upsampling, the same zeros
  unless the upsampling's rounding leaves a non-constant map (a non-zero constant; after a ReLU
  constant channels are zeros).

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
  n = b * c
  rep, constant = scorecam_plan(acts)
  work = ((rep == jnp.arange(c)) & ~constant).reshape(-1)
  n_work = jnp.sum(work)
  order = jnp.argsort(~work, stable=True).astype(jnp.int32)  # distinct masks first
  bs = max(1, min(int(batch_size), n))
  chunks = -(-n // bs)
  pos = jnp.arange(chunks * bs, dtype=jnp.int32).reshape(chunks, bs)

  run = _masked_scores(forward, images, acts, score)
  dtype = jax.eval_shape(run, state, pos[0]).dtype

  def chunk(s, p):
    idx = order[p % n]
    vals = jax.lax.cond(p[0] < n_work, run, lambda _, i: jnp.zeros(i.shape, dtype), s, idx)
    return s, (jnp.where(p < jnp.minimum(n_work, n), idx, n), vals)  # n: dropped below

  _, (dest, vals) = jax.lax.scan(chunk, state, pos)
  scores = jnp.zeros((n,), dtype).at[dest.reshape(-1)].set(vals.reshape(-1), mode='drop')
  scores = jnp.take_along_axis(scores.reshape(b, c), rep, axis=1)
  zero_out = forward(state, jnp.zeros((1,) + images.shape[1:], images.dtype))
  zero_out = jnp.broadcast_to(zero_out, (b,) + zero_out.shape[1:])
  zero_scores = at_least_f32(score(zero_out, jnp.arange(b, dtype=jnp.int32)))
  scores = jnp.where(constant, zero_scores[:, None], scores)
  return jax.nn.softmax(scores, axis=-1)


def scorecam_weights_all(
  forward: Callable,
  state,
  images: jax.Array,
  acts: jax.Array,
  score: Callable,
  batch_size: int,
) -> jax.Array:
  """ScoreCAM weights with one forward per (image, channel), no deduplication: the previous
  implementation, kept as the reference of ``scorecam_weights``'s savings (tests, benchmark).
  Arguments and result as :func:`scorecam_weights`."""
  b, _, _, c = acts.shape
  run = _masked_scores(forward, images, acts, score)

  scores = chunked_scores(run, b * c, batch_size, state).reshape(b, c)
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
