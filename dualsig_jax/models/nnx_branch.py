"""The paper's sigmoid branch for an NNX classifier that has its own head attribute.

One call::

    dual = nnx_dual_branch(model, head='head')   # model.head: the user's classifier head

gives ``dual``, a Linen-like view for this project's training step and optimizer:

* ``dual.init_variables()`` -> ``{'params': {'backbone', 'fc', 'fc2'}, 'batch_stats': ...}``:
  ``fc`` is the user's head, ``fc2`` the new sigmoid head (same structure; ``fc2_init='init'``
  draws it afresh like the reference, ``'clone'`` copies ``fc``), ``backbone`` everything else.
* ``dual.apply(variables, x, train=..., mutable=['batch_stats'], rngs={'dropout': key})`` ->
  ``{'features', 'softmax_logits', 'sigmoid_logits'}`` (and the updated collections when
  ``mutable`` is given), as ``train.state.train_step`` calls a Linen model. So
  ``make_optimizer(params, arch=None, stage='dual')`` freezes all but ``fc2`` and
  ``train_step(stage='dual', ...)`` trains it: backbone and softmax head stay bit-identical,
  batch statistics follow ``keep_batch_stats`` / ``train_mode`` as for the built-in models.
* ``dual.to_nnx(variables)`` -> an ``nnx.Module`` (``.model`` = the user's model with the
  trained weights, ``.fc2`` = the sigmoid head) whose call returns the same dict, for
  ``cam.explain(module, None, x, target_layer='model.<layer>', logits_fn='sigmoid_logits')``.

The features are what the model feeds its head (read by swapping ``model.<head>`` for a tap in a
fresh copy); the user's model object is never modified.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

FC2_INITS = ('init', 'clone')


class _HeadTap:
  """Stands in for the head: records its input and also runs the sigmoid head on it."""

  def __init__(self, head, fc2, record: dict):
    self.head, self.fc2, self.record = head, fc2, record

  def __call__(self, features, *args, **kwargs):
    self.record['features'] = features
    self.record['sigmoid_logits'] = self.fc2(features, *args, **kwargs)
    return self.head(features, *args, **kwargs)


class DualNnx(nnx.Module):
  """``model`` (with its head at ``head``) plus the sigmoid head ``fc2``."""

  def __init__(self, model: nnx.Module, fc2: nnx.Module, head: str):
    self.model = model
    self.fc2 = fc2
    self.head_name = head

  def __call__(self, x, **kwargs) -> dict:
    """``x [B, H, W, C]`` -> ``{'features', 'softmax_logits' [B, K], 'sigmoid_logits' [B, K]}``.

    The head attribute is swapped for a tap during the call only (restored even on error).
    """
    record: dict = {}
    head = getattr(self.model, self.head_name)
    setattr(self.model, self.head_name, _HeadTap(head, self.fc2, record))
    try:
      logits = self.model(x, **kwargs)
    finally:
      setattr(self.model, self.head_name, head)
    if 'features' not in record:
      raise ValueError(f'the model never called its head {self.head_name!r}')
    return {'features': record['features'], 'softmax_logits': logits, **record}


def _fresh_like(head: nnx.Module, seed: int) -> nnx.Module:
  from dualsig_jax.models.heads import fresh_head_params

  fc2 = nnx.clone(head)
  pure = nnx.to_pure_dict(nnx.state(fc2, nnx.Param))
  new = fresh_head_params(pure, seed)
  state = nnx.state(fc2, nnx.Param)
  nnx.replace_by_pure_dict(state, new)
  nnx.update(fc2, state)
  return fc2


class NnxDualView:
  """Linen-like view of a ``DualNnx`` for ``train.state.train_step`` (see the module doc)."""

  def __init__(self, dual: DualNnx):
    self.head = dual.head_name
    self._dual = dual
    train, evl = nnx.clone(dual), nnx.clone(dual)
    train.train()
    evl.eval()
    self._graphdefs = {True: nnx.split(train)[0], False: nnx.split(evl)[0]}
    _, _, _, self._rest = nnx.split(dual, nnx.Param, nnx.BatchStat, ...)

  def _to_variables(self, params_state, stats_state) -> dict:
    p = nnx.to_pure_dict(params_state)
    model = dict(p['model'])
    fc = model.pop(self.head)
    return {
      'params': {'backbone': model, 'fc': fc, 'fc2': p['fc2']},
      'batch_stats': nnx.to_pure_dict(stats_state),
    }

  def init_variables(self) -> dict:
    """``{'params': {'backbone', 'fc', 'fc2'}, 'batch_stats'}`` of the current weights."""
    _, params, stats, _ = nnx.split(self._dual, nnx.Param, nnx.BatchStat, ...)
    return jax.tree.map(jnp.asarray, self._to_variables(params, stats))

  def _module(self, variables, train: bool) -> DualNnx:
    p = variables['params']
    model = dict(p['backbone'])
    model[self.head] = p['fc']
    _, params, stats, _ = nnx.split(self._dual, nnx.Param, nnx.BatchStat, ...)
    nnx.replace_by_pure_dict(params, {'model': model, 'fc2': p['fc2']})
    nnx.replace_by_pure_dict(stats, variables.get('batch_stats', {}))
    return nnx.merge(self._graphdefs[train], params, stats, self._rest, copy=True)

  def apply(self, variables, x, *, train: bool = False, mutable=False, rngs=None):
    """As ``flax.linen.Module.apply`` of this project's models (``x [B, H, W, C]``)."""
    module = self._module(variables, bool(train))
    if rngs and 'dropout' in rngs:
      nnx.reseed(module, dropout=rngs['dropout'])
    out = module(x)
    if not mutable:
      return out
    _, stats, _ = nnx.split(module, nnx.BatchStat, ...)
    return out, {'batch_stats': nnx.to_pure_dict(stats)}

  def to_nnx(self, variables) -> DualNnx:
    """An ``nnx.Module`` in inference mode holding ``variables`` (for ``cam.explain``)."""
    return self._module(variables, False)


def nnx_dual_branch(
  model: nnx.Module, head: str = 'head', *, fc2_init: str = 'init', seed: int = 0
) -> NnxDualView:
  """Add the paper's sigmoid head to an NNX classifier whose head is ``model.<head>``.

  Args:
    model: the trained NNX classifier; its call must pass the features through
      ``self.<head>`` once (e.g. ``return self.head(pooled)``). It is not modified.
    head: the head attribute (any module: Linear, an MLP ``nnx.Sequential``...).
    fc2_init: ``'init'`` (fresh: Dense kernels ~ N(0, 0.01), biases 0, as the reference) or
      ``'clone'`` (a copy of the softmax head).
    seed: for ``'init'``.
  Returns:
    ``NnxDualView`` with ``init_variables()``, ``apply(...)`` and ``to_nnx(variables)``.
  """
  if fc2_init not in FC2_INITS:
    raise ValueError(f'unknown fc2_init {fc2_init!r}; valid: {FC2_INITS}')
  if not isinstance(model, nnx.Module):
    raise ValueError(f'model must be an nnx.Module, got {type(model).__name__}')
  if not isinstance(getattr(model, head, None), nnx.Module):
    subs = sorted(k for k, v in vars(model).items() if isinstance(v, nnx.Module))
    raise ValueError(f'model has no head module {head!r}; its submodules: {subs}')
  copy = nnx.clone(model)
  fc2 = (
    nnx.clone(getattr(copy, head))
    if fc2_init == 'clone'
    else _fresh_like(getattr(copy, head), seed)
  )
  return NnxDualView(DualNnx(copy, fc2, head))
