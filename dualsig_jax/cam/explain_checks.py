"""``explain``'s argument checks: one ``ValueError`` naming the cause and the remedy, raised
before anything runs, for every value that would otherwise give zero maps, a truncated class or
an internal JAX error (issue 23, item 9)."""

from __future__ import annotations

import math
import numbers

import jax
import numpy as np

from dualsig_jax.cam import targets as T
from dualsig_jax.cam.target_layer import layer_forward

_TARGET_FORMS = "None, int [B], 'all', ('topk', k) or a function output -> [B]"
_SHAPES: dict = {}  # (forward, state shapes, images shape) -> output shape


def methods_tuple(methods, check_one, valid) -> tuple:
  if isinstance(methods, str):
    methods = (methods,)
  methods = tuple(dict.fromkeys(check_one(m) for m in methods))
  if not methods:
    raise ValueError(f'methods must be non-empty; valid: {valid}')
  return methods


def check_images(images) -> None:
  if getattr(images, 'ndim', None) != 4:
    raise ValueError(f'images must be [B, H, W, C], got shape {getattr(images, "shape", None)}')
  if images.shape[0] == 0:
    raise ValueError('images is an empty batch (B=0): pass at least one image')


def positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f'{name} must be an int >= 1, got {value!r}')
  return int(value)


def _finite(value, name: str, positive: bool = False) -> float:
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
  if not ok or (positive and value <= 0):
    need = 'a finite number > 0' if positive else 'a finite number'
    raise ValueError(f'option {name} must be {need}, got {value!r}')
  return float(value)


def options(given, defaults: dict, kernels) -> dict:
  """Defaults overridden by ``given``, each value checked."""
  opts = dict(defaults)
  unknown = sorted(set(given or {}) - set(opts))
  if unknown:
    raise ValueError(f'unknown options {unknown}; valid: {sorted(opts)}')
  opts.update(given or {})
  opts['fem_k'] = _finite(opts['fem_k'], 'fem_k')
  opts['finer_alpha'] = _finite(opts['finer_alpha'], 'finer_alpha')
  if opts['kpca_gamma'] is not None:
    opts['kpca_gamma'] = _finite(opts['kpca_gamma'], 'kpca_gamma', positive=True)
  if opts['kpca_kernel'] not in kernels:
    raise ValueError(f'unknown kpca_kernel {opts["kpca_kernel"]!r}; valid: {kernels}')
  seed = opts['random_seed']
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
    raise ValueError(f'option random_seed must be an int >= 0, got {seed!r}')
  cmp = opts['finer_comparisons']
  cmp = (cmp,) if isinstance(cmp, numbers.Number) else cmp
  try:
    cmp = tuple(cmp)
  except TypeError:
    cmp = None
  if not cmp or not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in cmp):
    raise ValueError(
      f'option finer_comparisons must be positions (ints >= 1), e.g. (1, 2, 3), got '
      f'{opts["finer_comparisons"]!r}'
    )
  if min(cmp) < 1:
    raise ValueError(
      f'option finer_comparisons positions must be >= 1 (0 is the class itself), got {cmp}'
    )
  opts['finer_comparisons'] = tuple(int(p) for p in cmp)
  return opts


def output_size(size, images) -> tuple:
  if size is None:
    return tuple(int(v) for v in images.shape[1:3])
  try:
    size = tuple(size)
  except TypeError:
    size = ()
  if len(size) != 2 or not all(
    isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in size
  ):
    raise ValueError(f'output_size must be (H, W), two ints >= 1, got {size!r}')
  return tuple(int(v) for v in size)


def target_kind(targets, b: int, check: bool):
  """``(kind, traced part, static part)``; kind is ``argmax``, ``index``, ``all``, ``topk`` or
  ``function``."""
  if targets is None:
    return 'argmax', None, None
  if isinstance(targets, str):
    if targets != 'all':
      raise ValueError(f'targets={targets!r} is not understood; give {_TARGET_FORMS}')
    return 'all', None, None
  if isinstance(targets, tuple) and targets and isinstance(targets[0], str):
    if targets[0] != 'topk' or len(targets) != 2:
      raise ValueError(f'targets={targets!r} is not understood; give {_TARGET_FORMS}')
    return 'topk', positive_int(targets[1], 'k of targets=("topk", k)'), None
  if callable(targets) and not hasattr(targets, 'shape'):
    arrays, static = T.split_target(targets)
    return 'function', arrays, static
  if check and not isinstance(targets, jax.core.Tracer):
    arr = np.asarray(targets)
    if arr.dtype == object:
      raise ValueError(f'targets must be {_TARGET_FORMS}; got {type(targets).__name__}')
    T.check_categories(arr, None, b, 'targets')
    if arr.ndim != 1:
      raise ValueError(f'targets must be int [B]={b} (one class per image), got shape {arr.shape}')
  return 'index', jax.numpy.asarray(targets, jax.numpy.int32), None


def forwards(model, variables, target_layer, kw: dict, logits_2d: bool):
  """``(tuple of forwards, state)``: one forward per target layer, sharing the model's state."""
  if target_layer is None:
    raise ValueError(
      "target_layer is required: the layer to explain, e.g. 'layer4' (Linen scope path), "
      "'blocks.11' or the submodule (NNX), or a list of them"
    )
  layers = list(target_layer) if isinstance(target_layer, list) else [target_layer]
  if not layers:
    raise ValueError('target_layer is an empty list: name at least one layer')
  out, state = [], None
  for layer in layers:
    fwd, st = layer_forward(
      model,
      variables,
      layer,
      logits_fn=kw['logits_fn'],
      call_kwargs=kw['call_kwargs'],
      logits_2d=logits_2d,
    )
    out.append(fwd)
    state = st if state is None else state
  return tuple(out), state


def output_shape(forward, state, images) -> tuple:
  """The shape of the picked model output, traced once per (model, layer, input shape)."""
  leaves = jax.tree.leaves(state)
  key = (forward, tuple(getattr(x, 'shape', ()) for x in leaves), images.shape, images.dtype)
  if key not in _SHAPES:
    if len(_SHAPES) > 256:
      _SHAPES.clear()
    _SHAPES[key] = tuple(jax.eval_shape(lambda s, x: forward(s, x, None)[0], state, images).shape)
  return _SHAPES[key]


def check_targets_against(kind, targets, shape, b: int, methods, opts) -> None:
  """Checks that need the output's shape ``shape`` (``[B, K]`` logits unless a function)."""
  if kind == 'function':
    validate = getattr(targets, 'validate', None)
    if validate is not None:
      validate(shape)
    return
  k = shape[-1]
  if kind == 'index':
    T.check_categories(targets, k, b, 'targets')
  if kind == 'topk' and targets[1] > k:
    raise ValueError(f'targets=("topk", {targets[1]}) but the output has only {k} classes')
  if 'finercam' in methods:
    far = [p for p in opts['finer_comparisons'] if p >= k]
    if far:
      raise ValueError(
        f'option finer_comparisons {far} beyond the {k} classes: positions must be < {k}'
      )
