"""Train state and the pure train / eval steps (bound with functools.partial, jitted once)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from dualsig_jax.train import losses


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree of arrays, saved whole by Orbax."""

  step: jax.Array  # int32 []
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # uint32 [2], a raw PRNG key (checkpoint friendly)

  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats}


def create_state(variables: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
  params = variables['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=tx.init(params),
    rng=jax.random.PRNGKey(seed),
  )


def loss_fn(
  params,
  state: TrainState,
  batch,
  *,
  model,
  stage: str,
  train_mode: bool,
  keep_batch_stats: bool,
  pos_weight: float,
  gamma: float,
  temp: float,
):
  """Loss of one batch. vanilla: CE on the softmax head. dual: class-balanced BCE on the
  sigmoid head plus the softmax CE, which the reference logs too (it has no gradient when the
  backbone and fc are stop-gradient'ed).

  train_mode: BatchNorm normalises with the batch's statistics (over the global batch: the
    batch axis is sharded, so XLA reduces across devices) and dropout is on.
  keep_batch_stats: the updated running statistics are kept (vanilla) or dropped (the
    reference's dual stage, whose frozen BatchNorm never tracks statistics).
  """
  variables = {'params': params, 'batch_stats': state.batch_stats}
  rng = jax.random.fold_in(state.rng, state.step)
  if train_mode:
    out, updates = model.apply(
      variables, batch['image'], train=True, mutable=['batch_stats'], rngs={'dropout': rng}
    )
    new_stats = updates['batch_stats'] if keep_batch_stats else state.batch_stats
  else:
    out = model.apply(variables, batch['image'], train=False)
    new_stats = state.batch_stats
  label = batch['label']
  ce = losses.softmax_cross_entropy(out['softmax_logits'], label)
  metrics = {'ce': ce, 'acc': (out['softmax_logits'].argmax(-1) == label).mean()}
  if stage == 'vanilla':
    loss = ce
  else:
    bce = losses.balanced_bce_with_logits(
      out['sigmoid_logits'], label, pos_weight=pos_weight, gamma=gamma, temp=temp
    )
    metrics['bce'] = bce
    metrics['sigmoid_acc'] = (out['sigmoid_logits'].argmax(-1) == label).mean()
    loss = bce + ce
  metrics['loss'] = loss
  return loss, (new_stats, metrics)


def train_step(state: TrainState, batch: dict, *, model, tx, accum_steps: int = 1, **loss_kwargs):
  """One optimizer step on a (global) batch.

  Args:
    state: TrainState (replicated).
    batch: {'image': float32 [B, H, W, 3], 'label': int32 [B]} (sharded over 'data').
    model, tx, loss_kwargs: bound with functools.partial before jax.jit.
    accum_steps: > 1: the batch runs as this many micro-batches of B / accum_steps rows (rows
      i, i + k, ...: each device keeps its own rows), whose gradients `tx` (an
      optax.MultiSteps of that k) averages into one update; BatchNorm sees each micro-batch.
  Returns:
    (new_state, metrics dict of float32 scalars; with accum_steps > 1 their micro-batch mean).
  """
  if accum_steps > 1:
    return _accumulated_step(state, batch, model=model, tx=tx, k=accum_steps, **loss_kwargs)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, (new_stats, metrics)), grads = grad_fn(state.params, state, batch, model=model, **loss_kwargs)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
  )
  return new_state, metrics


def _accumulated_step(state: TrainState, batch: dict, *, model, tx, k: int, **loss_kwargs):
  def split(x):  # [B, ...] -> [k, B / k, ...], micro-batch j = rows j, j + k, ...
    return jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro(carry, xs):
    params, stats, opt_state = carry
    mb, j = xs
    # Each micro-batch draws its own dropout mask.
    st = state.replace(params=params, batch_stats=stats, rng=jax.random.fold_in(state.rng, j))
    (_, (stats, metrics)), grads = grad_fn(params, st, mb, model=model, **loss_kwargs)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), stats, opt_state), metrics

  init = (state.params, state.batch_stats, state.opt_state)
  (params, stats, opt_state), metrics = jax.lax.scan(
    micro, init, (jax.tree.map(split, batch), jnp.arange(k))
  )
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state
  )
  return new_state, jax.tree.map(lambda m: m.mean(0), metrics)


def predict_step(variables: dict, images: jax.Array, *, model) -> dict:
  """Both heads' logits: {'softmax_logits': [B, K], 'sigmoid_logits': [B, K]} float32."""
  out = model.apply(variables, images, train=False)
  return {
    'softmax_logits': out['softmax_logits'].astype(jnp.float32),
    'sigmoid_logits': out['sigmoid_logits'].astype(jnp.float32),
  }
