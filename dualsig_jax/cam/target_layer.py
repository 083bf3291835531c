"""Reading and editing one layer's output inside an unmodified Linen or NNX model.

``layer_forward(model, variables, target_layer, ...)`` returns ``(forward, state)``: ``forward``
is a hashable (static for ``jax.jit``) callable ``forward(state, images, edit) -> (logits [B, K],
activation)`` that runs the whole model once, hands back the target layer's output as it was
computed, and lets ``edit`` (``None`` or ``activation -> activation``) replace that output for
everything after it: a zero offset to differentiate with respect to it (the role of
pytorch-grad-cam's hooks), or an ablated copy (AblationCAM).

* Linen: ``nn.intercept_methods`` wraps every ``__call__``; the one whose scope path equals
  ``target_layer`` (``'layer4'``, ``'backbone/stage4/block_2'``) is read and edited. The module
  and its variables are never touched.
* NNX: the model is split once (``nnx.split``) and merged afresh inside each traced call; the
  copy's submodule at ``target_layer`` (an object of the model or a path such as ``'blocks.11'``)
  is swapped for a wrapper. The user's object is never mutated: its state after a call is the
  state before (BatchNorm statistics and RNG counters included).

The model is never hashed: a module with an unhashable field (a config object or dict, as HF
transformers' Flax models keep) is compared by identity instead (``Static``), and an NNX graph
definition that cannot be hashed is reused while the model's structure is unchanged, so the jit
cache does not grow on a second call. ``state`` is always an argument of ``forward``: callers
must pass it into every transform they apply (``jax.vjp``, ``eval_shape``, ``lax.scan``...)
rather than close over it, or an NNX model built from it (e.g. one with ``nnx.scan`` over its
blocks) sees values from another trace level.
"""

from __future__ import annotations

import dataclasses
import difflib
import weakref
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax import nnx


def _logits(out, logits_fn, logits_2d: bool = True) -> jax.Array:
  if isinstance(logits_fn, str):
    if not isinstance(out, dict) or logits_fn not in out:
      got = sorted(out) if isinstance(out, dict) else type(out).__name__
      raise ValueError(f'logits_fn={logits_fn!r}: the model output has no such key ({got})')
    out = out[logits_fn]
  elif logits_fn is not None:
    out = logits_fn(out)
  elif isinstance(out, dict) and 'softmax_logits' in out:
    out = out['softmax_logits']  # this project's models: the classifying head by default
  if not isinstance(out, jax.Array) or (logits_2d and out.ndim != 2):
    what = type(out).__name__ if not hasattr(out, 'shape') else f'shape {out.shape}'
    raise ValueError(
      f'the model output is {what}, not logits [B, K]: pass logits_fn=lambda out: ... '
      '(or a dict key) to pick them'
    )
  return out


def unknown_layer(name: str, valid: list[str]) -> ValueError:
  """``ValueError`` for an unknown layer, naming the closest valid paths (``difflib``)."""
  near = difflib.get_close_matches(name, valid, n=5, cutoff=0.3) or valid[:10]
  return ValueError(f'unknown target_layer {name!r}; nearest valid paths: {near}')


class Static:
  """A compile-time constant for ``jax.jit``: compared by value when hashable, else by identity
  (the jit cache keeps the object alive, so its ``id`` is not reused while cached)."""

  __slots__ = ('value', '_key')

  def __init__(self, value):
    self.value = value
    try:
      self._key = (True, hash(value))
    except TypeError:
      self._key = (False, id(value))

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    if not isinstance(other, Static) or self._key != other._key:
      return False
    if self.value is other.value or not self._key[0]:
      return self.value is other.value
    try:
      return type(self.value) is type(other.value) and bool(self.value == other.value)
    except (TypeError, ValueError):  # e.g. array fields: ambiguous truth value
      return False


class _ByKey:
  """Equality and hash of a forward from its fields, each wrapped in ``Static``."""

  def _key(self):
    return (type(self),) + tuple(Static(getattr(self, f.name)) for f in dataclasses.fields(self))

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return type(other) is type(self) and self._key() == other._key()


@dataclasses.dataclass(frozen=True, eq=False)
class LinenForward(_ByKey):
  """``forward(variables, images, edit)`` of a Linen module (see the module docstring)."""

  model: nn.Module
  path: tuple[str, ...]
  call_kwargs: tuple
  logits_fn: Any
  logits_2d: bool = True

  def __call__(self, variables, images, edit: Callable | None = None):
    hits, seen = [], []

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      scope = context.module.scope
      if context.method_name != '__call__' or scope is None:
        return out
      path = tuple(scope.path)
      seen.append('/'.join(path))
      if path != self.path:
        return out
      hits.append(out)
      return out if edit is None else edit(out)

    if not self.path:  # a plain forward (model_forward)
      out = self.model.apply(variables, images, **dict(self.call_kwargs))
      return _logits(out, self.logits_fn, self.logits_2d)
    with nn.intercept_methods(interceptor):
      out = self.model.apply(variables, images, **dict(self.call_kwargs))
    name = '/'.join(self.path)
    if not hits:
      raise unknown_layer(name, sorted({s for s in seen if s}))
    if len(hits) > 1:
      raise ValueError(f'target_layer {name!r} runs {len(hits)} times per forward; pick one')
    return _logits(out, self.logits_fn, self.logits_2d), _check_array(hits[0], name)


def _check_array(act, name: str) -> jax.Array:
  if not hasattr(act, 'shape') or not hasattr(act, 'dtype'):
    raise ValueError(f'target_layer {name!r} returns {type(act).__name__}, not one array')
  return act


class _Tap:
  """Stands in for an NNX submodule: calls it, records the output, applies ``edit``."""

  def __init__(self, inner, hits: list, edit):
    object.__setattr__(self, '_inner', inner)
    object.__setattr__(self, '_hits', hits)
    object.__setattr__(self, '_edit', edit)

  def __call__(self, *args, **kwargs):
    out = self._inner(*args, **kwargs)
    self._hits.append(out)
    return out if self._edit is None else self._edit(out)

  def __getattr__(self, name):  # the model may read the layer's attributes (e.g. a kernel)
    return getattr(self._inner, name)


def _nnx_paths(model) -> dict[tuple, Any]:
  return {tuple(p): node for p, node in nnx.iter_graph(model) if isinstance(node, nnx.Module) and p}


def _path_str(path: tuple) -> str:
  return '.'.join(str(p) for p in path)


def _child(node, key):
  return node[key] if isinstance(key, int) else getattr(node, key)


def _set_child(node, key, value):
  if isinstance(key, int):
    node[key] = value
  else:
    setattr(node, key, value)


@dataclasses.dataclass(frozen=True, eq=False)
class NnxForward(_ByKey):
  """``forward(state, images, edit)`` of an NNX module merged from ``graphdef`` and ``state``."""

  graphdef: Any
  path: tuple
  call_kwargs: tuple
  logits_fn: Any
  logits_2d: bool = True

  def __call__(self, state, images, edit: Callable | None = None):
    model = nnx.merge(self.graphdef, state)
    if not self.path:  # a plain forward (model_forward)
      return _logits(model(images, **dict(self.call_kwargs)), self.logits_fn, self.logits_2d)
    parent = model
    for key in self.path[:-1]:
      parent = _child(parent, key)
    hits: list = []
    _set_child(parent, self.path[-1], _Tap(_child(parent, self.path[-1]), hits, edit))
    out = model(images, **dict(self.call_kwargs))
    name = _path_str(self.path)
    if len(hits) != 1:
      raise ValueError(f'target_layer {name!r} ran {len(hits)} times per forward; need once')
    return _logits(out, self.logits_fn, self.logits_2d), _check_array(hits[0], name)


# model -> its last unhashable graphdef: a fresh nnx.split gives an equal but new object, which
# identity hashing would see as a new model (one more compile and cache entry per call).
_GRAPHDEFS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _split(model):
  graphdef, state = nnx.split(model)
  try:
    hash(graphdef)
    return graphdef, state
  except TypeError:
    pass
  old = _GRAPHDEFS.get(model)
  try:
    same = old is not None and bool(old == graphdef)
  except (TypeError, ValueError):
    same = False
  if same:
    return old, state
  _GRAPHDEFS[model] = graphdef
  return graphdef, state


def _hashable_kwargs(call_kwargs: dict) -> tuple:
  items = tuple(sorted(call_kwargs.items()))
  try:
    hash(items)
  except TypeError:
    raise ValueError(
      f'extra call arguments must be hashable (they are compile-time constants), got '
      f'{sorted(call_kwargs)}'
    ) from None
  return items


def layer_forward(
  model, variables, target_layer, *, logits_fn=None, call_kwargs=None, logits_2d=True
):
  """Build the static ``forward`` and its first argument for ``model`` and ``target_layer``.

  Args:
    model: a ``flax.linen.Module`` (with ``variables``) or an ``nnx.Module`` (``variables=None``).
    variables: the Linen variables pytree, or ``None`` for NNX.
    target_layer: Linen: scope path ``'a/b'`` or a tuple; NNX: the submodule object, a path
      ``'blocks.11'`` (``'/'`` also accepted) or a tuple.
    logits_fn: ``None`` (the output, or its ``'softmax_logits'``), a dict key, or a callable.
    call_kwargs: extra keyword arguments of the model call (hashable values, e.g. ``train=False``).
    logits_2d: require the picked output to be ``[B, K]`` (``False``: any array, for target
      functions such as segmentation).
  Returns:
    ``(forward, state)``; call ``forward(state, images, edit)`` under ``jax.jit`` with
    ``forward`` static.
  """
  kwargs = _hashable_kwargs(dict(call_kwargs or {}))
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError('an NNX model carries its own state: pass variables=None')
    return _nnx_forward(model, target_layer, kwargs, logits_fn, logits_2d)
  if not isinstance(model, nn.Module):
    raise ValueError(f'model must be a flax.linen or flax.nnx Module, got {type(model).__name__}')
  if variables is None:
    raise ValueError('a Linen model needs its variables (e.g. {"params": ...})')
  if isinstance(target_layer, nn.Module):
    raise ValueError("give a Linen target_layer as its scope path, e.g. 'backbone/layer4'")
  if not isinstance(target_layer, (str, tuple)):
    raise ValueError(
      f"target_layer must be a scope path like 'layer4' or ('backbone', 'layer4'), got "
      f'{type(target_layer).__name__}'
    )
  path = tuple(target_layer.split('/')) if isinstance(target_layer, str) else tuple(target_layer)
  if not path or not all(isinstance(p, str) and p for p in path):
    raise ValueError(f"target_layer must be a non-empty scope path like 'layer4', got {path!r}")
  return LinenForward(model, path, kwargs, logits_fn, logits_2d), variables


def _nnx_forward(model, target_layer, kwargs, logits_fn, logits_2d):
  paths = _nnx_paths(model)
  if isinstance(target_layer, nnx.Module):
    found = [p for p, node in paths.items() if node is target_layer]
    if not found:
      raise ValueError(f'target_layer {type(target_layer).__name__} is not a submodule of model')
    path = found[0]
  elif not isinstance(target_layer, (str, tuple)):
    raise ValueError(
      "target_layer must be a submodule of the model or its path like 'blocks.11', got "
      f'{type(target_layer).__name__}'
    )
  else:
    if isinstance(target_layer, str):
      parts = target_layer.replace('/', '.').split('.')
      path = tuple(int(p) if p.isdigit() else p for p in parts)
    else:
      path = tuple(target_layer)
    if path not in paths:
      raise unknown_layer(_path_str(path), sorted(_path_str(p) for p in paths))
  graphdef, state = _split(model)
  return NnxForward(graphdef, path, kwargs, logits_fn, logits_2d), state


def model_forward(model, variables, *, logits_fn=None, call_kwargs=None):
  """``(forward, state)`` with ``forward(state, images) -> logits [B, K]``: the whole model,
  no layer read (Linen or NNX, as ``layer_forward``)."""
  kwargs = _hashable_kwargs(dict(call_kwargs or {}))
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError('an NNX model carries its own state: pass variables=None')
    graphdef, state = _split(model)
    return NnxForward(graphdef, (), kwargs, logits_fn), state
  if not isinstance(model, nn.Module):
    raise ValueError(f'model must be a flax.linen or flax.nnx Module, got {type(model).__name__}')
  if variables is None:
    raise ValueError('a Linen model needs its variables (e.g. {"params": ...})')
  return LinenForward(model, (), kwargs, logits_fn), variables
