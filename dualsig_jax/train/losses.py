"""Losses of both stages, written to match the PyTorch reference's numbers.

optax has no `pos_weight` for sigmoid BCE, so the class-balanced loss is assembled from
`jax.nn.log_sigmoid` pieces; `tests/test_train.py` checks it against the formula and against
`torch.nn.BCEWithLogitsLoss(pos_weight=...)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(
  logits: jax.Array, labels: jax.Array, *, temp: float = 1.0, gamma: float = 1.0
) -> jax.Array:
  """Mean cross-entropy, as `F.cross_entropy`.

  Args:
    logits: [B, K] float.
    labels: [B] int32 class indices.
    temp: logits are divided by it first (reference option).
    gamma: reference option; `>= 1` is plain CE, `< 1` scales the log-probabilities by gamma.
  Returns:
    Scalar float32.
  """
  logits = logits.astype(jnp.float32) / temp
  if gamma >= 1.0:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  log_prob = jax.nn.log_softmax(logits, axis=-1) * gamma
  return -jnp.take_along_axis(log_prob, labels[:, None], axis=-1).mean()


def balanced_bce_with_logits(
  logits: jax.Array,
  labels: jax.Array,
  *,
  pos_weight: float | None,
  temp: float = 1.0,
  gamma: float = 1.0,
  eps: float = 1e-6,
) -> jax.Array:
  """Class-balanced binary cross-entropy on one-hot targets (the paper's sigmoid-head loss).

  For `gamma >= 1` this is `BCEWithLogitsLoss(pos_weight=pos_weight)` with mean reduction over
  batch and classes:  mean( -[p * y * log s(x) + (1 - y) * log(1 - s(x))] ),  s = sigmoid.
  For `gamma < 1` the reference switches to eps-smoothed log-probabilities scaled by gamma and no
  positive weight; reproduced here.

  Args:
    logits: [B, K] float sigmoid-head logits.
    labels: [B] int32 class indices (one-hot targets are built inside).
    pos_weight: weight p of the positive term; None = 1. The paper uses K - 1.
    temp: logits are divided by it first.
    gamma, eps: the reference's alternative form, see above.
  Returns:
    Scalar float32.
  """
  logits = logits.astype(jnp.float32) / temp
  y = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  if gamma >= 1.0:
    p = 1.0 if pos_weight is None else pos_weight
    # log(1 - s(x)) = log_sigmoid(-x): exact and stable for large |x|.
    loss = -(p * y * jax.nn.log_sigmoid(logits) + (1.0 - y) * jax.nn.log_sigmoid(-logits))
    return loss.mean()
  probs = jax.nn.sigmoid(logits)
  loss = -(y * jnp.log(probs + eps) * gamma + (1.0 - y) * jnp.log(1.0 - probs + eps) * gamma)
  return loss.mean()
