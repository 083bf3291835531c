"""``explain``: CAMs of any Flax model (Linen or NNX) at any layer, with no change to the model.

One call, one compile per (model, layer, methods, options, target kind, input shape), cached by
``jax.jit``::

    maps, targets = cam.explain(model, variables, images, target_layer='layer4',
                                methods=('gradcam', 'scorecam'))

The layer's output ``A`` is read, and the target score differentiated with respect to it, by
adding a zero offset to it inside the model (``target_layer.py``); gradients flow through
everything after the layer, as pytorch-grad-cam's hooks do. One forward and one VJP serve all
gradient methods; ScoreCAM / AblationCAM add ``B * C`` batched forwards; ShapleyCAM adds a
Hessian-vector product. Maps are post-processed exactly as ``compute.postprocess_maps`` does for
the gradient methods (pytorch-grad-cam's ReLU, min-max, bilinear resize, then wsolevaluation's
normalization); several layers are averaged after resizing, as the package does. Images sharded
over devices stay sharded (``jax.jit`` propagates it).

Targets (``targets.py``): a class per image, the argmax, a JAX function of the output, or every
class / the top k, vmapped over one shared forward: the forward, the masked forwards of ScoreCAM
and AblationCAM and the class-free methods run once; each class adds one VJP (gradient methods,
FinerCAM) or one Hessian-vector product (ShapleyCAM) and the map arithmetic.

``maps_fn`` is the same computation as a pure function of ``(state, images, targets)``, to call
inside one's own ``jax.jit`` / ``vmap`` / ``grad``; methods without a usable gradient raise when
differentiated (``NOT_DIFFERENTIABLE``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dualsig_jax import vocab
from dualsig_jax.cam import explain_checks as C
from dualsig_jax.cam import layer_methods as L
from dualsig_jax.cam import methods as M
from dualsig_jax.cam import targets as T
from dualsig_jax.cam.compute import postprocess_maps
from dualsig_jax.cam.perturbation import ablation_weights, scorecam_weights
from dualsig_jax.cam.resize import resize_maps

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
# Methods whose maps have no gradient worth following: differentiating them raises this.
NOT_DIFFERENTIABLE = {
  'eigencam': "an SVD's first component, whose sign is arbitrary",
  'eigengradcam': "an SVD's first component, whose sign is arbitrary",
  'kpcacam': 'an eigenvector, whose sign is chosen by a discontinuous rule',
  'fem': 'channel weights counted above a threshold (zero gradient almost everywhere)',
  'randomcam': 'random channel weights',
}
# ttach's default for aug_smooth: horizontal flip x multiply by (0.9, 1, 1.1).
_AUG_FLIPS = (False, True)
_AUG_FACTORS = (0.9, 1.0, 1.1)
_CLASS_CHUNK = 32  # classes per vmap with targets='all' / ('topk', k); see _compute


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
  target: tuple | None = None  # the compile-time half of a target function (targets.split_target)
  classes: str | int | None = None  # 'all', k for ('topk', k), or None (one map per image)

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


def _scorer(cfg: _Config, tgt, b: int):
  """``score(output [N, ...], rows int32 [N] | None) -> float32 [N]``: the target score of each
  row; ``rows`` says which image each row copies (ScoreCAM / AblationCAM batches)."""
  if cfg.target is None:

    def score(out, rows=None):
      t = tgt if rows is None else tgt[rows]
      return jnp.take_along_axis(M.at_least_f32(out), t[:, None], axis=1)[:, 0]

  else:

    def score(out, rows=None):
      arrays = tgt if rows is None else T.rows_of(tgt, rows, b)
      return T.check_scores(T.join_target(arrays, cfg.target)(out), out.shape[0])

  return score


def _zero_tangent(x):
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _not_differentiable(x, why):
  return x


@_not_differentiable.defjvp
def _not_differentiable_jvp(why, primals, tangents):
  raise ValueError(f'cannot differentiate {why}; use gradcam, hirescam, layercam, ...')


def _raw_maps(forward, state, images, tgt, cfg: _Config):
  """Raw maps ``{method: [B, h, w]}`` and targets for one (possibly augmented) batch.

  ``state`` is an argument of every function handed to a JAX transform (never closed over).
  """
  methods = set(cfg.methods)
  b = images.shape[0]

  def add(o):
    return lambda a: a + o

  shape = jax.eval_shape(lambda s, x: forward(s, x, None)[1], state, images)
  zero = jnp.zeros(shape.shape, shape.dtype)
  (out, raw), vjp = jax.vjp(lambda o, s: forward(s, images, add(o)), zero, state)
  if cfg.target is None and tgt is None:
    tgt = jnp.argmax(out, axis=-1).astype(jnp.int32)
  score = _scorer(cfg, tgt, b)
  acts = _to_nhwc(raw, cfg.reshape_transform)
  to_nhwc = functools.partial(_to_nhwc, reshape_transform=cfg.reshape_transform)

  def grads_for(ct_out):
    return to_nhwc(vjp((ct_out.astype(out.dtype), jnp.zeros_like(raw)))[0])

  grads = None
  if methods & _NEEDS_GRADS:
    if cfg.target is None:  # d score / d output of a class index: its one-hot
      ct = jax.nn.one_hot(tgt, out.shape[-1], dtype=jnp.float32)
    else:
      ct = jax.grad(lambda o: jnp.sum(score(o)))(out)
    grads = grads_for(ct)
  es, tr = cfg.eigen_smooth, cfg.truncate

  def weighted(w):
    return L.weighted_map(acts, w, eigen_smooth=es, truncate=tr)

  res = {}
  for m in cfg.methods:
    if m == 'gradcam':
      res[m] = weighted(M.grad_cam_weights(grads))
    elif m == 'gradcam++':
      res[m] = weighted(M.grad_cam_plus_plus_weights(acts, grads))
    elif m == 'xgradcam':
      res[m] = weighted(M.xgrad_cam_weights(acts, grads))
    elif m == 'hirescam':
      res[m] = L.hirescam(acts, grads, eigen_smooth=es)
    elif m == 'layercam':
      res[m] = L.layercam(acts, grads, eigen_smooth=es)
    elif m == 'gradcamelementwise':
      res[m] = L.gradcam_elementwise(acts, grads, eigen_smooth=es)
    elif m == 'eigencam':
      res[m] = L.eigencam(acts)
    elif m == 'eigengradcam':
      res[m] = L.eigengradcam(acts, grads)
    elif m == 'segeigencam':
      res[m] = L.seg_eigen_cam(acts, grads)
    elif m == 'kpcacam':
      res[m] = L.kpca_cam(acts, kernel=cfg.opt('kpca_kernel'), gamma=cfg.opt('kpca_gamma'))
    elif m == 'fem':
      res[m] = L.fem(acts, k=cfg.opt('fem_k'))
    elif m == 'randomcam':
      key = jax.random.key(cfg.opt('random_seed'))
      res[m] = weighted(jax.random.uniform(key, acts.shape[::3], jnp.float32, -1.0, 1.0))
    elif m == 'finercam':
      if cfg.target is not None:
        raise ValueError('finercam compares class logits: give class-index targets')
      main, cmp = L.finer_classes(out, tgt, tuple(cfg.opt('finer_comparisons')))
      alpha = cfg.opt('finer_alpha')
      ct = jax.grad(lambda lg: jnp.sum(L.finer_target_score(lg, main, cmp, alpha)))(
        M.at_least_f32(out)
      )
      res[m] = weighted(M.grad_cam_weights(grads_for(ct)))
    elif m == 'shapleycam':
      # The state is a VJP primal too (its cotangent dropped): an argument left out keeps the
      # outer trace, where an NNX model's nnx.scan refuses it; vjp (not grad) takes int leaves.
      def g_at(o, s):
        f = lambda o2, s2: jnp.sum(score(forward(s2, images, add(o2))[0]))  # noqa: E731
        y, pull = jax.vjp(f, o, s)
        return pull(jnp.ones_like(y))[0]

      g, hvp = jax.jvp(g_at, (zero, state), (raw, jax.tree.map(_zero_tangent, state)))
      res[m] = weighted(L.shapley_weights(to_nhwc(g), to_nhwc(hvp)))
    elif m == 'scorecam':
      fwd = lambda s, x: forward(s, x, None)[0]  # noqa: E731
      res[m] = weighted(scorecam_weights(fwd, state, images, acts, score, cfg.batch_size))
    elif m == 'ablationcam':
      fwd = lambda s, x, edit: forward(s, x, edit)[0]  # noqa: E731
      w = ablation_weights(fwd, state, images, raw, score(out), score, cfg.batch_size)
      res[m] = weighted(w)
    if m in NOT_DIFFERENTIABLE or es:
      why = f'{m} maps: {NOT_DIFFERENTIABLE.get(m, "eigen_smooth projects on an SVD component")}'
      res[m] = _not_differentiable(res[m], why)
  return res, (tgt if cfg.target is None else score(out))


def _aggregate(raws: list, size: tuple) -> jax.Array:
  """One layer: ``postprocess_maps``. Several: each ReLU, min-max and resize, then the mean,
  ReLU and min-max (pytorch-grad-cam's ``aggregate_multi_layers``), then wsolevaluation's."""
  if len(raws) == 1:
    return postprocess_maps(raws[0], 'gradcam', size)
  per_layer = [resize_maps(M.scale_cam_image(jnp.maximum(r, 0.0)), size, 'linear') for r in raws]
  mean = sum(per_layer) / len(per_layer)
  return M.normalize_scoremap(M.scale_cam_image(jnp.maximum(mean, 0.0)))


def _final_maps(forwards, state, images, tgt, cfg):
  raws, used = [], None
  for forward in forwards:
    raw, used = _raw_maps(forward, state, images, tgt, cfg)
    raws.append(raw)
  return {m: _aggregate([r[m] for r in raws], cfg.output_size) for m in cfg.methods}, used


def _smoothed(forwards, state, images, tgt, cfg):
  if not cfg.aug_smooth:
    return _final_maps(forwards, state, images, tgt, cfg)
  # aug_smooth (pytorch-grad-cam + ttach): the mean of the final maps over the augmentations,
  # each flipped back; with targets=None each augmented batch takes its own argmax.
  total, plain_targets = None, None
  for flip in _AUG_FLIPS:
    for factor in _AUG_FACTORS:
      x = images * jnp.asarray(factor, images.dtype)
      x = x[:, :, ::-1] if flip else x
      maps, t = _final_maps(forwards, state, x, tgt, cfg)
      maps = {m: (v[:, :, ::-1] if flip else v) for m, v in maps.items()}
      total = maps if total is None else {m: total[m] + maps[m] for m in maps}
      if not flip and factor == 1.0:
        plain_targets = t
  n = len(_AUG_FLIPS) * len(_AUG_FACTORS)
  return {m: v / n for m, v in total.items()}, plain_targets


def _compute(state, images, tgt, *, forwards, cfg: _Config):
  if cfg.classes is None:
    return _smoothed(forwards, state, images, tgt, cfg)
  # Every class / the top k: one map per class, vmapped. Nothing before the target score
  # depends on the class, so vmap leaves the forwards unbatched (computed once).
  logits = forwards[0](state, images, None)[0]
  if cfg.classes == 'all':
    classes = jnp.broadcast_to(jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape)
  else:
    classes = jax.lax.top_k(logits, cfg.classes)[1].astype(jnp.int32)
  one = dataclasses.replace(cfg, classes=None)

  def per_class(s, t):  # t int32 [B, n] -> maps [B, n, H, W]
    return jax.vmap(
      lambda s2, tk: _smoothed(forwards, s2, images, tk, one), in_axes=(None, 1), out_axes=1
    )(s, t)

  b, n = classes.shape
  if n <= _CLASS_CHUNK:
    return per_class(state, classes)
  # More classes than one chunk: vmapped chunks in a scan. On XLA:CPU, one vmap over 200
  # classes gave wrong maps for every class past the 32nd (bench/bench_cam_classes.py); chunks
  # of 32 match the per-class maps. The forwards are recomputed once per chunk.
  pad = -n % _CLASS_CHUNK
  chunks = jnp.pad(classes, ((0, 0), (0, pad)), mode='edge').reshape(b, -1, _CLASS_CHUNK)
  _, (maps, used) = jax.lax.scan(
    lambda s, t: (s, per_class(s, t)), state, jnp.moveaxis(chunks, 1, 0)
  )
  join = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, -1, *x.shape[3:])[:, :n]  # noqa: E731
  return {m: join(v) for m, v in maps.items()}, join(used)


_explain = jax.jit(_compute, static_argnames=('forwards', 'cfg'))


def _prepare(model, variables, images, target_layer, methods, targets, kw: dict, check: bool):
  """Validated ``(forwards, state, tgt, cfg)`` for ``_compute`` (see ``explain``'s args)."""
  methods = C.methods_tuple(methods, check_explain_method, EXPLAIN_METHODS)
  C.check_images(images)
  kind, tgt, static = C.target_kind(targets, images.shape[0], check)
  forwards, state = C.forwards(model, variables, target_layer, kw, logits_2d=kind != 'function')
  opts = C.options(kw.pop('options'), DEFAULT_OPTIONS, L.KPCA_KERNELS)
  if check:
    shape = C.output_shape(forwards[0], state, images)
    C.check_targets_against(kind, targets, shape, images.shape[0], methods, opts)
  if 'finercam' in methods and kind == 'function':
    raise ValueError('finercam compares class logits: give class-index targets, not a function')
  cfg = _Config(
    methods=methods,
    reshape_transform=kw['reshape_transform'],
    batch_size=C.positive_int(kw['batch_size'], 'batch_size'),
    eigen_smooth=bool(kw['eigen_smooth']),
    aug_smooth=bool(kw['aug_smooth']),
    truncate=bool(kw['truncate_negative_weights']),
    output_size=C.output_size(kw['output_size'], images),
    options=tuple(sorted(opts.items())),
    target=static,
    classes=None if kind not in ('all', 'topk') else ('all' if kind == 'all' else tgt),
  )
  return forwards, state, (None if kind in ('all', 'topk') else tgt), cfg


def explain(
  model,
  variables,
  images: jax.Array,
  target_layer,
  methods: Sequence[str] = ('gradcam',),
  targets=None,
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
    model: a ``flax.linen.Module`` or an ``nnx.Module``, unmodified (unhashable fields, e.g. a
      config object, and NNX models with ``nnx.scan`` over their blocks are fine).
    variables: the Linen variables; ``None`` for an NNX model.
    images: float ``[B, H, W, C]`` with ``B >= 1``, as the model expects them (may be sharded).
    target_layer: Linen: the submodule's scope path as in the params tree (``'layer4'``,
      ``'backbone/stage4/block_2'`` or a tuple of names). NNX: the submodule object or its
      attribute path (``'layer4'``, ``'blocks.11'``). A list of layers: their maps are
      averaged as pytorch-grad-cam does (each resized and min-max scaled, then the mean).
    methods: names from ``EXPLAIN_METHODS``.
    targets: ``None`` (each image's argmax class); int ``[B]`` (a class per image); ``'all'``
      or ``('topk', k)`` (maps for every class / the k highest per image); or a JAX function
      ``output -> float [B]`` scoring each image, such as ``targets.SemanticSegmentationTarget``
      (see ``dualsig_jax.cam.targets``).
    logits_fn: picks the output from the model's result: a callable, a dict key (e.g.
      ``'sigmoid_logits'`` for this project's sigmoid head), or ``None`` (the result itself, or
      its ``'softmax_logits'``). It must be logits ``[B, K]`` unless ``targets`` is a function.
      Define it once: a new function object recompiles.
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
    ``(maps, targets)``: ``maps[method]`` float32 ``[B, H, W]`` in [0, 1] and ``targets`` int32
    ``[B]``; with ``'all'`` / ``('topk', k)``: ``[B, K, H, W]`` / ``[B, k, H, W]`` maps and the
    classes int32 ``[B, K]`` / ``[B, k]``; with a target function: its scores float32 ``[B]``.
  """
  kw = dict(
    logits_fn=logits_fn,
    reshape_transform=reshape_transform,
    batch_size=batch_size,
    eigen_smooth=eigen_smooth,
    aug_smooth=aug_smooth,
    truncate_negative_weights=truncate_negative_weights,
    output_size=output_size,
    options=options,
    call_kwargs=call_kwargs,
  )
  forwards, state, tgt, cfg = _prepare(
    model, variables, images, target_layer, methods, targets, kw, check=True
  )
  return _explain(state, images, tgt, forwards=forwards, cfg=cfg)
