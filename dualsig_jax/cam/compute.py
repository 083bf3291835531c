"""High-level, jitted, batched CAM computation for any Flax model with a feature map and a head.

The model is seen through three plain functions (all hashable, passed as static jit args, so
pass the *same* function objects on every call or jit retraces):

* ``apply_fn(variables, images [B, H, W, 3]) -> dict`` with ``'features' [B, h, w, C]`` and the
  logits of the branches used: ``'softmax_logits' [B, K]`` and/or ``'sigmoid_logits' [B, K]``.
* ``head_fn(variables, features [B, h, w, C]) -> dict`` of the same logits, computed from the
  features alone (GAP + Dense, or 1x1 conv + GAP); only needed for the gradient methods. The
  gradients are taken through this function only, so the backbone is never differentiated.
* ``head_weights_fn(variables, branch) -> (w [C, K], b [K])``; only needed for ``method='cam'``.

One forward pass serves every method, both branches and all targets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dualsig_jax import vocab
from dualsig_jax.cam import methods as M
from dualsig_jax.cam.resize import resize_maps
from dualsig_jax.cam.targets import check_categories

BRANCHES = vocab.BRANCHES
LOGIT_KEYS = {'softmax': 'softmax_logits', 'sigmoid': 'sigmoid_logits'}


def check_branch(branch: str) -> str:
  """Return ``branch`` or raise ``ValueError`` listing the valid names."""
  if branch not in BRANCHES:
    raise ValueError(f'unknown branch {branch!r}; valid: {BRANCHES}')
  return branch


def default_truncate(branch: str) -> bool:
  """The paper clamps negative channel weights for the sigmoid head only."""
  return check_branch(branch) == 'sigmoid'


def postprocess_maps(raw: jax.Array, method: str, output_size: tuple[int, int]) -> jax.Array:
  """Turn raw maps into the reference's normalized, resized score maps.

  ``cam``: resize with ``cv2.INTER_CUBIC`` semantics, then ``normalize_scoremap``.
  Gradient methods (pytorch-grad-cam's path, then wsolevaluation's): ReLU, min-max with eps
  1e-7, resize with ``cv2.INTER_LINEAR`` semantics, ReLU, min-max with eps 1e-7, (the reference's
  same-size bicubic resize is the identity), then ``normalize_scoremap``.
  A map with a NaN or a constant map becomes zeros.

  Args:
    raw: float ``[B, h, w]``.
    method: one of ``METHODS``.
    output_size: ``(H, W)``.
  Returns:
    float32 ``[B, H, W]`` in [0, 1].
  """
  M.check_method(method)
  if method == 'cam':
    return M.normalize_scoremap(resize_maps(raw, output_size, 'cubic'))
  x = M.scale_cam_image(jnp.maximum(raw, 0.0))
  x = resize_maps(x, output_size, 'linear')
  x = M.scale_cam_image(jnp.maximum(x, 0.0))
  return M.normalize_scoremap(x)


def _targets_from(out: dict, branch_keys: Sequence[str], targets) -> jax.Array:
  if targets is not None:
    return targets
  # The paper's figure: the softmax head's prediction k* drives both branches.
  key = 'softmax_logits' if 'softmax_logits' in out else branch_keys[0]
  return jnp.argmax(out[key], axis=-1).astype(jnp.int32)


def feature_gradients(
  head_fn: Callable,
  variables,
  features: jax.Array,
  targets: jax.Array,
  branches: Sequence[str] = BRANCHES,
) -> dict:
  """Gradients of each branch's target logits w.r.t. the features, through the head only.

  One head forward and one VJP per branch of ``sum_b logit[b, targets[b]]``; summing over the
  batch is exact per image because images do not interact in an inference-mode head.

  Args:
    head_fn: ``(variables, features) -> {'softmax_logits': [B, K], 'sigmoid_logits': [B, K]}``.
    variables: model variables.
    features: float ``[B, h, w, C]``.
    targets: int ``[B]``.
    branches: names from ``BRANCHES``.
  Returns:
    ``{branch: float [B, h, w, C]}``. Jittable.
  """
  head_out, vjp = jax.vjp(lambda f: head_fn(variables, f), features)
  grads = {}
  for b in branches:
    k = LOGIT_KEYS[check_branch(b)]
    if k not in head_out:
      raise ValueError(f'head_fn output lacks {k!r}; it has {sorted(head_out)}')
    ct = jax.tree.map(jnp.zeros_like, head_out)
    ct[k] = jax.nn.one_hot(targets, head_out[k].shape[-1], dtype=head_out[k].dtype)
    grads[b] = vjp(ct)[0]
  return grads


@functools.partial(
  jax.jit,
  static_argnames=(
    'apply_fn',
    'head_fn',
    'head_weights_fn',
    'methods',
    'branches',
    'output_size',
    'truncate',
  ),
)
def _compute_multi(
  variables,
  images,
  targets,
  *,
  apply_fn,
  head_fn,
  head_weights_fn,
  methods,
  branches,
  output_size,
  truncate,
):
  out = apply_fn(variables, images)
  if not isinstance(out, dict) or 'features' not in out:
    got = sorted(out) if isinstance(out, dict) else type(out).__name__
    raise ValueError(f"apply_fn must return a dict with 'features' and logits, got {got}")
  feats = jax.lax.stop_gradient(out['features'])
  keys = [LOGIT_KEYS[b] for b in branches]
  for k in keys:
    if k not in out:
      raise ValueError(f'apply_fn output lacks {k!r}; it has {sorted(out)}')
  targets = _targets_from(out, keys, targets)

  grads = {}
  if any(m in M.GRADIENT_METHODS for m in methods):
    grads = feature_gradients(head_fn, variables, feats, targets, branches)
  maps = {}
  for b, trunc in zip(branches, truncate):
    for m in methods:
      if m == 'cam':
        w, _ = head_weights_fn(variables, b)
        class_w = jnp.take(jnp.asarray(w), targets, axis=1).T  # [B, C]
        raw = M.cam(feats, class_w, truncate_negative_weights=trunc)
      else:
        raw = M.GRADIENT_FORMULAS[m](feats, grads[b], truncate_negative_weights=trunc)
      maps[(m, b)] = postprocess_maps(raw, m, output_size)
  # An empty [0, K] array: its shape tells the caller K after dispatch, with no extra trace
  # and no wait for the device (the upper bound of the targets is checked there).
  num_classes = min(out[k].shape[-1] for k in keys)
  return maps, targets, jnp.zeros((0, num_classes), jnp.int32)


def _check_targets(targets, b: int) -> None:
  """Integer classes ``[B]``, none negative. The upper bound needs the logits' shape: the
  caller checks it against the traced step's class count."""
  check_categories(targets, None, b, 'targets')
  if np.ndim(targets) != 1:
    raise ValueError(f'targets must be int [B]={b} (one class per image), got {np.shape(targets)}')
  if not isinstance(targets, jax.core.Tracer) and np.size(targets) and np.min(targets) < 0:
    bad = np.asarray(targets)[np.asarray(targets) < 0][:5].tolist()
    raise ValueError(f'targets {bad} out of range: class indices are >= 0')


def compute_cams_multi(
  apply_fn: Callable,
  variables,
  images: jax.Array,
  *,
  methods: Sequence[str] = ('cam',),
  branches: Sequence[str] = BRANCHES,
  targets: jax.Array | None = None,
  output_size: tuple[int, int] | None = None,
  head_fn: Callable | None = None,
  head_weights_fn: Callable | None = None,
  truncate_negative_weights: bool | None = None,
):
  """Maps for several methods and branches from one jitted forward pass.

  Args:
    apply_fn: ``(variables, images) -> {'features', 'softmax_logits', 'sigmoid_logits'}``.
    variables: the model's variables pytree.
    images: float32 ``[B, H, W, 3]`` (already normalized as the model expects).
    methods: names from ``METHODS`` (``cam``, ``gradcam``, ``gradcam++``, ``xgradcam``,
      ``layercam``).
    branches: names from ``BRANCHES`` (``softmax``, ``sigmoid``).
    targets: int ``[B]`` class per image (e.g. GT labels), or ``None`` for the softmax head's
      argmax (or the first branch's argmax if the model has no ``softmax_logits``).
    output_size: ``(H, W)`` of the maps; default the images' ``(H, W)``.
    head_fn: ``(variables, features) -> logits dict``; required by gradient methods.
    head_weights_fn: ``(variables, branch) -> (w [C, K], b [K])``; required by ``cam``.
    truncate_negative_weights: ReLU on channel weights; ``None`` = per-branch default
      (``True`` for ``sigmoid``, ``False`` for ``softmax``), a bool applies to all branches.
  Returns:
    ``(maps, targets)``: ``maps[(method, branch)]`` float32 ``[B, H, W]`` in [0, 1];
    ``targets`` int32 ``[B]``.
  """
  methods = tuple(M.check_method(m) for m in methods)
  branches = tuple(check_branch(b) for b in branches)
  if not methods or not branches:
    raise ValueError('methods and branches must be non-empty')
  if images.ndim != 4:
    raise ValueError(f'images must be [B, H, W, C], got shape {images.shape}')
  if any(m in M.GRADIENT_METHODS for m in methods) and head_fn is None:
    raise ValueError(f'methods {methods} need head_fn(variables, features) -> logits dict')
  if 'cam' in methods and head_weights_fn is None:
    raise ValueError("method 'cam' needs head_weights_fn(variables, branch) -> (w, b)")
  if truncate_negative_weights is None:
    truncate = tuple(default_truncate(b) for b in branches)
  else:
    truncate = (bool(truncate_negative_weights),) * len(branches)
  size = tuple(images.shape[1:3]) if output_size is None else output_size
  size = tuple(int(v) for v in size)
  if images.shape[0] == 0:
    raise ValueError('images is an empty batch (B=0): pass at least one image')
  given = None
  if targets is not None:
    _check_targets(targets, images.shape[0])
    given = None if isinstance(targets, jax.core.Tracer) else np.asarray(targets)
    targets = jnp.asarray(targets, jnp.int32)
  maps, targets, classes = _compute_multi(
    variables,
    images,
    targets,
    apply_fn=apply_fn,
    head_fn=head_fn,
    head_weights_fn=head_weights_fn,
    methods=methods,
    branches=branches,
    output_size=size,
    truncate=truncate,
  )
  k = classes.shape[1]
  if given is not None and given.size and given.max() >= k:
    # one_hot / take would silently give an all-zero or clamped map for such a class.
    bad = given[given >= k][:5].tolist()
    raise ValueError(f'targets {bad} out of range: the model has {k} classes (0..{k - 1})')
  return maps, targets


def compute_cams(
  apply_fn: Callable,
  variables,
  images: jax.Array,
  *,
  method: str,
  branch: str = 'sigmoid',
  targets: jax.Array | None = None,
  output_size: tuple[int, int] | None = None,
  head_fn: Callable | None = None,
  head_weights_fn: Callable | None = None,
  truncate_negative_weights: bool | None = None,
):
  """Normalized CAMs of one method and one branch (see ``compute_cams_multi`` for the args).

  Returns:
    ``(maps float32 [B, H, W] in [0, 1], targets int32 [B])``.
  """
  maps, targets = compute_cams_multi(
    apply_fn,
    variables,
    images,
    methods=(method,),
    branches=(branch,),
    targets=targets,
    output_size=output_size,
    head_fn=head_fn,
    head_weights_fn=head_weights_fn,
    truncate_negative_weights=truncate_negative_weights,
  )
  return maps[(method, branch)], targets


def linear_head_fns(param_paths: dict | None = None, *, bias: bool = True):
  """``(head_fn, head_weights_fn)`` for GAP + Dense heads stored in ``variables['params']``.

  Handy with a model that ``sow``s its features: the head is re-expressed from its params.

  Args:
    param_paths: ``{branch: tuple of param-tree keys to the Dense}``, default
      ``{'softmax': ('fc',), 'sigmoid': ('fc2',)}``; branches missing from the params are skipped.
    bias: whether the Dense layers have a ``bias``.
  Returns:
    ``head_fn(variables, features [B, h, w, C]) -> {'<branch>_logits': [B, K]}`` and
    ``head_weights_fn(variables, branch) -> (kernel [C, K], bias [K])``.
  """
  paths = dict(param_paths or {'softmax': ('fc',), 'sigmoid': ('fc2',)})
  for b in paths:
    check_branch(b)

  def _dense(variables, branch):
    node = variables['params']
    for key in paths[branch]:
      node = node[key]
    if 'kernel' not in node:
      # e.g. an MLP head {'0': {...}, '3': {...}}: silently skipping it would hide the branch.
      where = 'params/' + '/'.join(map(str, paths[branch]))
      err = M.linear_head_required(
        f'the {branch} head at {where} is not one Dense layer (it holds {sorted(node)})'
      )
      raise ValueError(f'{err} with a head_fn that applies the whole head') from None
    w = node['kernel']
    return w, (node['bias'] if bias else jnp.zeros(w.shape[-1], w.dtype))

  def head_fn(variables, features):
    pooled = jnp.mean(features, axis=(1, 2))
    out = {}
    for b in paths:
      try:
        w, bb = _dense(variables, b)
      except KeyError:
        continue
      out[LOGIT_KEYS[b]] = pooled @ w + bb
    return out

  def head_weights_fn(variables, branch):
    if check_branch(branch) not in paths:
      raise ValueError(f'no param path for branch {branch!r}; have {sorted(paths)}')
    return _dense(variables, branch)

  return head_fn, head_weights_fn
