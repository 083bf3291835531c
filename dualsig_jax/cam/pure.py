"""CAMs as a pure function, to call inside one's own ``jax.jit`` / ``vmap`` / ``grad``.

``maps_fn`` returns ``(fn, state)``; ``fn(state, images, targets=None) -> (maps, targets)`` is
``explain``'s computation with nothing cached or checked on the host, so it traces inside a
caller's transform and is differentiable with respect to the state (the model's parameters) and
the images. A training step can thus add a term on the maps to its loss::

    fn, params = cam.maps_fn(model, variables, 'layer4', ('gradcam',), logits_fn='sigmoid_logits')

    def loss(params, images, labels, boxes_mask):
      maps, _ = fn(params, images, labels)
      return classification_loss(...) + jnp.mean(maps['gradcam'] * (1 - boxes_mask))

For Linen, ``state`` is the variables; for NNX, ``nnx.split(model)[1]`` (the same structure as
returned). Methods listed in ``explain.NOT_DIFFERENTIABLE`` (and ``eigen_smooth``) raise a
``ValueError`` when differentiated; the others follow their formulas' gradients (the
normalizations' min / max pick one pixel, ReLUs are piecewise linear).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dualsig_jax.cam import explain_checks as C
from dualsig_jax.cam.explain import EXPLAIN_METHODS, _compute, _prepare, check_explain_method


def maps_fn(
  model,
  variables,
  target_layer,
  methods: Sequence[str] = ('gradcam',),
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
  """``(fn, state)``: ``fn(state, images [B, H, W, C], targets=None)`` is ``explain`` as a pure
  function (the same arguments, see ``explain``).

  ``targets`` as in ``explain``: ``None``, int ``[B]``, ``'all'``, ``('topk', k)`` or a target
  function; values are not checked on the host (they may be traced). Returns maps float32
  ``[B, H, W]`` per method (``[B, K, H, W]`` for ``'all'`` / top k) and the targets.
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
  C.methods_tuple(methods, check_explain_method, EXPLAIN_METHODS)
  _, state = C.forwards(model, variables, target_layer, kw, logits_2d=False)

  def fn(state, images, targets=None):
    forwards, _, tgt, cfg = _prepare(
      model, variables, images, target_layer, methods, targets, dict(kw), check=False
    )
    return _compute(state, images, tgt, forwards=forwards, cfg=cfg)

  return fn, state
