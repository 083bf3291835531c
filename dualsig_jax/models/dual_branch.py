"""Turn any Flax classifier into the paper's dual-branch model (frozen softmax head + sigmoid head).

The method does not depend on the backbone: keep the trained classifier, add a copy of its head
(the sigmoid head), freeze the rest, train the copy with class-balanced BCE. :func:`dual_branch`
does this for a model split into a feature module and a head module and gives the result the
contract of this package's models (``apply(v, x, train)`` -> ``{'features', 'softmax_logits',
'sigmoid_logits'}``, ``method='head'``, params ``backbone`` / ``fc`` / ``fc2``), so
``train.state.train_step(stage='dual')``, ``train.optim.make_optimizer(arch=None)`` and
``cam.compute_cams`` work on it unchanged. Plain CAM needs a linear or 1x1-conv head; the gradient
methods (Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM) work through any head.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualsig_jax.models.heads import (  # noqa: F401 (re-exported: the wrapper's API)
  FC2_INITS,
  fresh_head_params,
  head_weights,
  init_sigmoid_head,
)

HEAD_KINDS = ('linear', 'conv', 'mlp', 'map')
# Keyword names a module may use for its train / inference switch; True means "pass not train".
_TRAIN_KWARGS = {'train': False, 'training': False, 'deterministic': True,
                 'use_running_average': True}  # fmt: skip


def _train_kwargs(module: nn.Module, method: str, train_arg: str | None, train: bool) -> dict:
  """The keyword that tells ``module.<method>`` train vs inference (``{}`` if it takes none)."""
  if train_arg is None:
    return {}
  if train_arg != 'auto':
    return {train_arg: (not train) if _TRAIN_KWARGS.get(train_arg) else train}
  params = inspect.signature(getattr(type(module), method)).parameters
  for name, inverted in _TRAIN_KWARGS.items():
    if name in params:
      return {name: (not train) if inverted else train}
  return {}


def infer_head_kind(head: nn.Module) -> str:
  """``'linear'`` for ``nn.Dense``, ``'conv'`` for a 1x1 ``nn.Conv``, else ``'mlp'``."""
  if isinstance(head, nn.Dense):
    return 'linear'
  if isinstance(head, nn.Conv):
    ks = (head.kernel_size,) if isinstance(head.kernel_size, int) else tuple(head.kernel_size)
    if all(int(k) == 1 for k in ks):
      return 'conv'
    raise ValueError(
      f'a conv head must be 1x1 for CAM, got kernel_size {head.kernel_size}; pass '
      "head_kind='map' to use it as an arbitrary head (gradient methods only)"
    )
  return 'mlp'


class DualBranch(nn.Module):
  """Dual-branch model: a feature module, a softmax head ``fc`` and a sigmoid head ``fc2``.

  Build it with :func:`dual_branch` (a user's modules) or ``models.build_model`` (the built-in
  backbones, whose extra fields come from their spec): ``inline_backbone`` keeps the feature
  module's params at the top level (``features``, ``layer1``, ... beside ``fc`` / ``fc2``, the
  tree every checkpoint of this package has), ``head_dropout`` > 0 drops the heads' shared input
  (a Dropout named ``head_dropout_name``), ``dtype`` is the compute dtype the pure head casts
  its features to, and ``arch`` / ``family`` name a built-in model (CAM errors, fresh inits).
  """

  backbone: nn.Module
  head_factory: Callable[[], nn.Module]
  head_kind: str = 'linear'
  frozen_backbone: bool = True
  features_method: str = '__call__'
  train_arg: str | None = 'auto'
  inline_backbone: bool = False
  head_dropout: float = 0.0
  head_dropout_name: str | None = None
  dtype: Any = None
  arch: str | None = None
  family: str | None = None
  min_input_size: int = 64

  def setup(self):
    if self.head_kind not in HEAD_KINDS:
      raise ValueError(f'unknown head_kind {self.head_kind!r}; valid: {HEAD_KINDS}')
    if self.inline_backbone:
      nn.share_scope(self, self.backbone)
    # Detached copies, so the attribute names (not the user's names) become the param keys.
    self.fc = self.head_factory().clone(parent=None, name=None)
    self.fc2 = self.head_factory().clone(parent=None, name=None)

  def _features(self, x, train):
    kw = _train_kwargs(self.backbone, self.features_method, self.train_arg, train)
    f = getattr(self.backbone, self.features_method)(x, **kw)
    if f.ndim != 4:
      raise ValueError(f'the feature module must return [B, h, w, C], got shape {f.shape}')
    return f

  def _head_input(self, f: jax.Array) -> jax.Array:
    """What both heads read: the map (conv, map kinds) or its global average (linear, mlp)."""
    return f if self.head_kind in ('conv', 'map') else jnp.mean(f, axis=(1, 2))

  def _branch(self, layer: nn.Module, x: jax.Array, train: bool) -> jax.Array:
    kw = _train_kwargs(layer, '__call__', self.train_arg, train)
    out = layer(x, **kw)
    if self.head_kind == 'conv':
      if out.ndim != 4:
        raise ValueError(f"head_kind='conv' needs a head returning [B, h, w, K], got {out.shape}")
      out = jnp.mean(out, axis=(1, 2))
    if out.ndim != 2:
      raise ValueError(f'the head must give logits [B, K], got shape {out.shape}')
    return out.astype(jnp.float32)

  def head(self, features: jax.Array) -> dict[str, jax.Array]:
    """Pure head on ``features [B, h, w, C]`` -> ``{'softmax_logits', 'sigmoid_logits'}``
    ``[B, K]`` float32. No stop-gradient, inference mode (no dropout): CAM methods
    differentiate through this."""
    if self.dtype is not None:
      features = features.astype(self.dtype)
    x = self._head_input(features)
    return {
      'softmax_logits': self._branch(self.fc, x, False),
      'sigmoid_logits': self._branch(self.fc2, x, False),
    }

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """``x [B, H, W, 3]`` -> ``{'features' [B, h, w, C], 'softmax_logits' [B, K],
    'sigmoid_logits' [B, K]}`` float32. ``train`` goes to the user's modules (BatchNorm batch
    statistics, dropout); with ``frozen_backbone`` nothing upstream of ``fc2`` gets a gradient.
    """
    f = self._features(x, train)
    if self.frozen_backbone:
      f = jax.lax.stop_gradient(f)
    h = self._head_input(f)
    if self.head_dropout > 0:
      # One mask for both heads, as the reference's models apply one dropout before them.
      h = nn.Dropout(self.head_dropout, deterministic=not train, name=self.head_dropout_name)(h)
    soft = self._branch(self.fc, h, train)
    if self.frozen_backbone:
      soft = jax.lax.stop_gradient(soft)
    return {
      'features': f.astype(jnp.float32),
      'softmax_logits': soft,
      'sigmoid_logits': self._branch(self.fc2, h, train),
    }


def dual_branch(
  features: nn.Module,
  head: nn.Module | Callable[[], nn.Module],
  *,
  frozen_backbone: bool = True,
  head_kind: str | None = None,
  features_method: str = '__call__',
  train_arg: str | None = 'auto',
) -> DualBranch:
  """Wrap a user's feature module and head into a dual-branch (softmax + sigmoid head) model.

  Args:
    features: module mapping images ``[B, H, W, 3]`` to a feature map ``[B, h, w, C]`` (the
      CAM target layer); its params go under ``'backbone'``.
    head: the classifier head as a module or a zero-argument factory of one. Two copies are made,
      ``'fc'`` (softmax) and ``'fc2'`` (sigmoid); what they receive depends on ``head_kind``.
    frozen_backbone: ``True`` (dual stage): stop-gradient on the features and on the softmax
      logits, so only ``fc2`` can learn. ``False``: everything is differentiable (vanilla stage).
    head_kind: ``'linear'`` (GAP -> head), ``'conv'`` (head on the map, e.g. a 1x1 conv -> GAP),
      ``'mlp'`` (GAP -> any head) or ``'map'`` (the head pools the map itself). ``None`` infers
      it: ``nn.Dense`` -> linear, 1x1 ``nn.Conv`` -> conv, anything else -> mlp.
    features_method: the method of ``features`` to call, e.g. ``'features'`` to reuse a whole
      model that has a ``features`` method (modules it never calls get no params).
    train_arg: keyword carrying ``train`` to the user's modules: ``'auto'`` picks the first of
      ``train``, ``training``, ``deterministic``, ``use_running_average`` in the signature
      (the last two inverted), a name forces it, ``None`` passes nothing.
  Returns:
    a :class:`DualBranch`; initialise it with ``model.init`` or load a trained single-head model
    with :func:`from_single_head`.

  Example (a model ``Net`` whose ``__call__`` is ``Head(name='head')(Features(name='features')
  (x, train))``, with GAP -> Dense -> ReLU -> Dense inside ``Head``)::

    model = dual_branch(Features(), Head(num_classes=10))              # head_kind 'mlp'
    variables = from_single_head(model, net_variables, head_key='head', features_key='features')
    out = model.apply(variables, images)  # features, softmax_logits, sigmoid_logits
    # train: make_optimizer(variables['params'], arch=None, stage='dual', ...) + train_step
    fns = cam_fns(model)                   # apply_fn, head_fn, head_weights_fn
    maps, _ = compute_cams(variables=variables, images=images, method='gradcam',
                           branch='sigmoid', **fns)
  """
  if not isinstance(features, nn.Module):
    raise ValueError(f'features must be a flax.linen Module, got {type(features).__name__}')
  if isinstance(head, nn.Module):
    template = head

    def factory() -> nn.Module:
      return template.clone(parent=None, name=None)
  elif callable(head):
    factory = head
    template = head()
    if not isinstance(template, nn.Module):
      raise ValueError(f'head() must return a flax.linen Module, got {type(template).__name__}')
  else:
    raise ValueError(f'head must be a Module or a factory of one, got {type(head).__name__}')
  if head_kind is None:
    head_kind = infer_head_kind(template)
  if head_kind not in HEAD_KINDS:
    raise ValueError(f'unknown head_kind {head_kind!r}; valid: {HEAD_KINDS}')
  if not callable(getattr(type(features), features_method, None)):
    raise ValueError(f'{type(features).__name__} has no method {features_method!r}')
  return DualBranch(
    backbone=features.clone(parent=None, name=None),
    head_factory=factory,
    head_kind=head_kind,
    frozen_backbone=bool(frozen_backbone),
    features_method=features_method,
    train_arg=train_arg,
  )


def _plain(tree):
  """Nested plain dicts (FrozenDict and other mappings converted); leaves untouched."""
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def _key_path(key: str | Sequence[str]) -> tuple[str, ...]:
  return (key,) if isinstance(key, str) else tuple(key)


def _get(tree: Mapping, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]  # KeyError / TypeError when absent, handled by the callers
  return tree


def from_single_head(
  model: DualBranch,
  variables,
  *,
  head_key: str | Sequence[str],
  features_key: str | Sequence[str] | None = None,
  fc2: str = 'init',
  rng: jax.Array | int = 0,
  input_shape: tuple[int, ...] | None = (1, 64, 64, 3),
) -> dict:
  """Variables of ``model`` from a trained single-head model's ``variables``.

  Args:
    model: the :func:`dual_branch` model.
    variables: the user's ``{'params': ..., 'batch_stats': ...}`` (any collections).
    head_key: key (or key path) of the head's subtree in each collection, e.g. ``'head'``.
    features_key: key (or key path) of the feature module's subtree; ``None`` = every top-level
      entry except ``head_key`` (a model whose layers sit at its top level).
    fc2: ``'init'`` (every Linear normal(0, 0.01), a conv xavier-uniform, biases 0: the
      reference's published run) or ``'clone'`` (a copy of the softmax head, the paper's text).
    rng: key or int seed for ``fc2='init'``.
    input_shape: an image shape for checking the result against ``model``'s own parameter
      shapes (abstractly, nothing is computed); ``None`` skips the check.
  Returns:
    ``{collection: {'backbone': ..., 'fc': ..., 'fc2': ...}}`` (plain dicts; collections with
    no entry for the features or head get none), with ``'params'`` and ``'batch_stats'`` always
    present.
  """
  head_path = _key_path(head_key)
  out: dict = {'params': {}, 'batch_stats': {}}
  for col, tree in _plain(variables).items():
    try:
      head = _get(tree, head_path)
    except (KeyError, TypeError):
      head = None
    if col == 'params' and head is None:
      raise ValueError(f'head_key {head_key!r} not in the params; top-level keys: {sorted(tree)}')
    if features_key is None:
      feats = {k: v for k, v in tree.items() if k != head_path[0]}
      if len(head_path) > 1:
        raise ValueError('features_key=None needs a top-level head_key, got a path')
    else:
      try:
        feats = _get(tree, _key_path(features_key))
      except (KeyError, TypeError):
        if col == 'params':
          raise ValueError(
            f'features_key {features_key!r} not in the params; top-level keys: {sorted(tree)}'
          ) from None
        feats = {}
    entry = {}
    if feats:
      entry['backbone'] = feats
    if head is not None:
      entry['fc'] = head
    out.setdefault(col, {}).update(entry)
  out = init_sigmoid_head(out, mode=fc2, rng=rng)
  if input_shape is not None:
    _check_against(model, out, input_shape)
  return out


def _check_against(model: DualBranch, variables: dict, input_shape) -> None:
  """Raise ValueError listing where ``variables`` and ``model``'s own init disagree."""
  key = jax.random.key(0)
  want = jax.eval_shape(
    lambda: model.init({'params': key, 'dropout': key}, jnp.zeros(input_shape), train=False)
  )
  want = {c: t for c, t in _plain(want).items() if c in ('params', 'batch_stats')}
  flat_w = {jax.tree_util.keystr((c,) + tuple(p)): v.shape for c in want for p, v in _flat(want[c])}
  flat_h = {
    jax.tree_util.keystr((c,) + tuple(p)): jnp.shape(v)
    for c in want
    for p, v in _flat(variables.get(c, {}))
  }
  problems = [
    f'{k}: have {flat_h.get(k, "nothing")}, model wants {flat_w.get(k, "nothing")}'
    for k in sorted(set(flat_w) | set(flat_h))
    if tuple(flat_w.get(k, ())) != tuple(flat_h.get(k, ())) or (k in flat_w) != (k in flat_h)
  ]
  if problems:
    more = f' (+{len(problems) - 8} more)' if len(problems) > 8 else ''
    raise ValueError(
      'the loaded variables do not fit the dual-branch model (check head_key / features_key '
      f'and input_shape): {"; ".join(problems[:8])}{more}'
    )


def _flat(tree):
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def cam_fns(model) -> dict[str, Callable]:
  """Adapters for ``dualsig_jax.cam.compute_cams`` / ``compute_cams_multi`` of a
  :class:`DualBranch` (every model of this package):
  ``apply_fn(variables, images [B, H, W, 3])`` (inference mode), ``head_fn(variables, features
  [B, h, w, C])`` and ``head_weights_fn(variables, branch) -> (w [C, K], b [K])`` (linear and
  1x1-conv heads; other kinds raise ``ValueError`` naming the methods that work). Call once and
  reuse: jit caches on the functions' identity."""
  if not isinstance(model, DualBranch):
    raise ValueError(f'cam_fns needs a DualBranch model, got {type(model).__name__}')
  kind, arch, family = model.head_kind, model.arch, model.family

  def apply_fn(variables, images):
    return model.apply(variables, images, train=False)

  def head_fn(variables, features):
    return model.apply(variables, features, method='head')

  def head_weights_fn(variables, branch):
    return head_weights(variables, branch, kind, arch=arch, family=family)

  return {'apply_fn': apply_fn, 'head_fn': head_fn, 'head_weights_fn': head_weights_fn}
