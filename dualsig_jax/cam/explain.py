"""``explain``: CAMs of any Flax model (Linen or NNX) at any layer, with no change to the model.

One call, one compile per (model, layer, methods, options, input shape), cached by ``jax.jit``::

    maps, targets = cam.explain(model, variables, images, target_layer='layer4',
                                methods=('gradcam', 'scorecam'))

The layer's output ``A`` is read, and the target score differentiated with respect to it, by
adding a zero offset to it inside the model (``target_layer.py``); gradients flow through
everything after the layer, as pytorch-grad-cam's hooks do. One forward and one VJP serve all
gradient methods; ScoreCAM / AblationCAM add ``B * C`` batched forwards; ShapleyCAM adds a
Hessian-vector product. Maps are post-processed exactly as ``compute.postprocess_maps`` does for
the gradient methods (pytorch-grad-cam's ReLU, min-max, bilinear resize, then wsolevaluation's
normalization). Images sharded over devices stay sharded (``jax.jit`` propagates it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from dualsig_jax import vocab
from dualsig_jax.cam import layer_methods as L
from dualsig_jax.cam import methods as M
from dualsig_jax.cam.compute import postprocess_maps
from dualsig_jax.cam.perturbation import ablation_weights, scorecam_weights
from dualsig_jax.cam.target_layer import layer_forward

EXPLAIN_METHODS = vocab.EXPLAIN_METHODS
# Methods whose map needs d score / d A for the plain target logit.
_NEEDS_GRADS = frozenset(
  ('gradcam', 'hirescam', 'gradcam++', 'xgradcam', 'layercam', 'gradcamelementwise')
  + ('eigengradcam', 'segeigencam')
)
# Methods whose map is a weighted sum of channels (truncate_negative_weights applies).
WEIGHTED_METHODS = (
  'gradcam',
  'gradcam++',
  'xgradcam',
  'scorecam',
  'ablationcam',
  'shapleycam',
  'finercam',
  'fem',
  'randomcam',
)
# pytorch-grad-cam 1.5.7 defaults of the per-method constructor / call arguments.
DEFAULT_OPTIONS = {
  'fem_k': 2.0,
  'kpca_kernel': 'sigmoid',
  'kpca_gamma': None,
  'finer_alpha': 1.0,
  'finer_comparisons': (1, 2, 3),
  'random_seed': 0,
}
_NOT_HERE = {
  'cam': "plain CAM reads a linear head's weights: use compute_cams_multi, or 'gradcam' "
  '(equal to CAM up to scale for GAP + linear heads)',
  'fullgrad': 'FullGrad needs the gradient of every bias term of the network, which a '
  'single-layer hook does not give; it is not implemented',
}
# ttach's default for aug_smooth: horizontal flip x multiply by (0.9, 1, 1.1).
_AUG_FLIPS = (False, True)
_AUG_FACTORS = (0.9, 1.0, 1.1)


def check_explain_method(method: str) -> str:
  """Return ``method`` or raise ``ValueError`` listing the valid names."""
  if method in _NOT_HERE:
    raise ValueError(f'method {method!r}: {_NOT_HERE[method]}')
  if method not in EXPLAIN_METHODS:
    raise ValueError(f'unknown method {method!r}; valid: {EXPLAIN_METHODS}')
  return method


@dataclasses.dataclass(frozen=True)
class _Config:
  methods: tuple
  reshape_transform: Callable | None
  batch_size: int
  eigen_smooth: bool
  aug_smooth: bool
  truncate: bool
  output_size: tuple
  options: tuple

  def opt(self, name):
    return dict(self.options)[name]


def _to_nhwc(x: jax.Array, reshape_transform) -> jax.Array:
  if reshape_transform is not None:
    x = reshape_transform(x)
  if x.ndim != 4:
    raise ValueError(
      f'the target layer gives shape {tuple(x.shape)}, not [B, h, w, C]: pass '
      'reshape_transform (e.g. for ViT tokens [B, 1 + h*w, C]: '
      'lambda t: t[:, 1:].reshape(t.shape[0], h, w, t.shape[-1]))'
    )
  return x


def _target_logit_sum(logits, targets):
  return jnp.sum(jnp.take_along_axis(logits.astype(jnp.float32), targets[:, None], axis=1))


def _raw_maps(forward, state, images, targets, cfg: _Config):
  """Raw maps ``{method: [B, h, w]}`` and targets for one (possibly augmented) batch."""
  methods = set(cfg.methods)

  def fwd(x, edit=None):
    return forward(state, x, edit)

  shape = jax.eval_shape(lambda x: fwd(x)[1], images)
  zero = jnp.zeros(shape.shape, shape.dtype)
  (logits, raw), vjp = jax.vjp(lambda o: fwd(images, lambda a: a + o), zero)
  raw = jax.lax.stop_gradient(raw)
  if targets is None:
    targets = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  acts = _to_nhwc(raw, cfg.reshape_transform)
  to_nhwc = functools.partial(_to_nhwc, reshape_transform=cfg.reshape_transform)

  def grads_for(ct_logits):
    return to_nhwc(vjp((ct_logits.astype(logits.dtype), jnp.zeros_like(raw)))[0])

  grads = None
  if methods & _NEEDS_GRADS:
    grads = grads_for(jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32))
  es, tr = cfg.eigen_smooth, cfg.truncate

  def weighted(w):
    return L.weighted_map(acts, w, eigen_smooth=es, truncate=tr)

  out = {}
  for m in cfg.methods:
    if m == 'gradcam':
      out[m] = weighted(M.grad_cam_weights(grads))
    elif m == 'gradcam++':
      out[m] = weighted(M.grad_cam_plus_plus_weights(acts, grads))
    elif m == 'xgradcam':
      out[m] = weighted(M.xgrad_cam_weights(acts, grads))
    elif m == 'hirescam':
      out[m] = L.hirescam(acts, grads, eigen_smooth=es)
    elif m == 'layercam':
      out[m] = L.layercam(acts, grads, eigen_smooth=es)
    elif m == 'gradcamelementwise':
      out[m] = L.gradcam_elementwise(acts, grads, eigen_smooth=es)
    elif m == 'eigencam':
      out[m] = L.eigencam(acts)
    elif m == 'eigengradcam':
      out[m] = L.eigengradcam(acts, grads)
    elif m == 'segeigencam':
      out[m] = L.seg_eigen_cam(acts, grads)
    elif m == 'kpcacam':
      out[m] = L.kpca_cam(acts, kernel=cfg.opt('kpca_kernel'), gamma=cfg.opt('kpca_gamma'))
    elif m == 'fem':
      out[m] = L.fem(acts, k=cfg.opt('fem_k'))
    elif m == 'randomcam':
      key = jax.random.key(cfg.opt('random_seed'))
      out[m] = weighted(jax.random.uniform(key, acts.shape[::3], jnp.float32, -1.0, 1.0))
    elif m == 'finercam':
      main, cmp = L.finer_classes(logits, targets, tuple(cfg.opt('finer_comparisons')))
      alpha = cfg.opt('finer_alpha')
      ct = jax.grad(lambda lg: jnp.sum(L.finer_target_score(lg, main, cmp, alpha)))(
        jax.lax.stop_gradient(logits).astype(jnp.float32)
      )
      out[m] = weighted(M.grad_cam_weights(grads_for(ct)))
    elif m == 'shapleycam':
      g_at = jax.grad(lambda o: _target_logit_sum(fwd(images, lambda a: a + o)[0], targets))
      g, hvp = jax.jvp(g_at, (zero,), (raw,))
      out[m] = weighted(L.shapley_weights(to_nhwc(g), to_nhwc(hvp)))
    elif m == 'scorecam':
      w = scorecam_weights(lambda x: fwd(x)[0], images, acts, targets, cfg.batch_size)
      out[m] = weighted(w)
    elif m == 'ablationcam':
      w = ablation_weights(
        lambda x, edit: fwd(x, edit)[0], images, raw, logits, targets, cfg.batch_size
      )
      out[m] = weighted(w)
  return out, targets


def _final_maps(forward, state, images, targets, cfg):
  raw, targets = _raw_maps(forward, state, images, targets, cfg)
  return {m: postprocess_maps(r, 'gradcam', cfg.output_size) for m, r in raw.items()}, targets


@functools.partial(jax.jit, static_argnames=('forward', 'cfg'))
def _explain(state, images, targets, *, forward, cfg: _Config):
  if not cfg.aug_smooth:
    return _final_maps(forward, state, images, targets, cfg)
  # aug_smooth (pytorch-grad-cam + ttach): the mean of the final maps over the augmentations,
  # each flipped back; with targets=None each augmented batch takes its own argmax.
  total, plain_targets = None, None
  for flip in _AUG_FLIPS:
    for factor in _AUG_FACTORS:
      x = images * jnp.asarray(factor, images.dtype)
      x = x[:, :, ::-1] if flip else x
      maps, t = _final_maps(forward, state, x, targets, cfg)
      maps = {m: (v[:, :, ::-1] if flip else v) for m, v in maps.items()}
      total = maps if total is None else {m: total[m] + maps[m] for m in maps}
      if not flip and factor == 1.0:
        plain_targets = t
  n = len(_AUG_FLIPS) * len(_AUG_FACTORS)
  return {m: v / n for m, v in total.items()}, plain_targets


def explain(
  model,
  variables,
  images: jax.Array,
  target_layer,
  methods: Sequence[str] = ('gradcam',),
  targets: jax.Array | None = None,
  *,
  logits_fn: Callable | str | None = None,
  reshape_transform: Callable | None = None,
  batch_size: int = 32,
  eigen_smooth: bool = False,
  aug_smooth: bool = False,
  truncate_negative_weights: bool = False,
  output_size: tuple[int, int] | None = None,
  options: dict | None = None,
  **call_kwargs,
):
  """CAMs of ``model`` at ``target_layer`` for each method, jitted and batched.

  Args:
    model: a ``flax.linen.Module`` or an ``nnx.Module``, unmodified.
    variables: the Linen variables; ``None`` for an NNX model.
    images: float ``[B, H, W, C]``, as the model expects them (may be sharded).
    target_layer: Linen: the submodule's scope path as in the params tree (``'layer4'``,
      ``'backbone/stage4/block_2'``). NNX: the submodule object or its attribute path
      (``'layer4'``, ``'blocks.11'``).
    methods: names from ``EXPLAIN_METHODS``.
    targets: int ``[B]`` class per image, or ``None`` for the argmax of the logits.
    logits_fn: picks ``[B, K]`` logits from the output: a callable, a dict key (e.g.
      ``'sigmoid_logits'`` for this project's sigmoid head), or ``None`` (the output itself, or
      its ``'softmax_logits'``). Define it once: a new function object recompiles.
    reshape_transform: ``layer output -> [B, h, w, C]`` (e.g. ViT tokens without the class
      token); applied to activations and gradients, as in pytorch-grad-cam.
    batch_size: forwards per chunk for ScoreCAM and AblationCAM.
    eigen_smooth: project the weighted activations on their first principal component.
    aug_smooth: average over horizontal flip x (0.9, 1, 1.1) input scaling (ttach's default).
    truncate_negative_weights: ReLU on channel weights (``WEIGHTED_METHODS`` only).
    output_size: ``(H, W)`` of the maps; default the images' size.
    options: overrides of ``DEFAULT_OPTIONS`` (FEM ``k``, KPCA kernel/gamma, FinerCAM alpha and
      comparison positions, RandomCAM seed).
    **call_kwargs: passed to the model call (e.g. ``train=False``); hashable values.
  Returns:
    ``(maps, targets)``: ``maps[method]`` float32 ``[B, H, W]`` in [0, 1]; ``targets`` int32
    ``[B]``.
  """
  if isinstance(methods, str):
    methods = (methods,)
  methods = tuple(dict.fromkeys(check_explain_method(m) for m in methods))
  if not methods:
    raise ValueError(f'methods must be non-empty; valid: {EXPLAIN_METHODS}')
  if getattr(images, 'ndim', None) != 4:
    raise ValueError(f'images must be [B, H, W, C], got shape {getattr(images, "shape", None)}')
  if int(batch_size) < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  opts = dict(DEFAULT_OPTIONS)
  unknown = sorted(set(options or {}) - set(opts))
  if unknown:
    raise ValueError(f'unknown options {unknown}; valid: {sorted(opts)}')
  opts.update(options or {})
  opts['finer_comparisons'] = tuple(int(p) for p in opts['finer_comparisons'])
  if opts['kpca_kernel'] not in L.KPCA_KERNELS:
    raise ValueError(f'unknown kpca_kernel {opts["kpca_kernel"]!r}; valid: {L.KPCA_KERNELS}')
  size = tuple(int(v) for v in (images.shape[1:3] if output_size is None else output_size))
  if targets is not None:
    targets = jnp.asarray(targets, jnp.int32)
    if targets.shape != images.shape[:1]:
      raise ValueError(f'targets must be [B]={images.shape[0]}, got shape {targets.shape}')
  forward, state = layer_forward(
    model, variables, target_layer, logits_fn=logits_fn, call_kwargs=call_kwargs
  )
  cfg = _Config(
    methods=methods,
    reshape_transform=reshape_transform,
    batch_size=int(batch_size),
    eigen_smooth=bool(eigen_smooth),
    aug_smooth=bool(aug_smooth),
    truncate=bool(truncate_negative_weights),
    output_size=size,
    options=tuple(sorted(opts.items())),
  )
  return _explain(state, images, targets, forward=forward, cfg=cfg)
