"""Methods built on other methods' maps (pytorch-grad-cam 1.5.7's meta-methods): RefineCAM (the
product of one method's maps over several layers) and SESS (a method's maps over sliding
windows of several scales, weighted by each window's score and fused).

Both call ``explain`` for the maps they combine, so every model, layer and option of ``explain``
works here; formulas read from the package's ``refine_cam.py`` and ``sess.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from dualsig_jax.cam.explain import explain
from dualsig_jax.cam.methods import scale_cam_image


def refine_cam(
  model,
  variables,
  images: jax.Array,
  target_layers: Sequence,
  method: str = 'gradcam++',
  targets: jax.Array | None = None,
  **explain_kwargs,
):
  """RefineCAM: ``scale_cam_image(prod_l map_l)``, ``map_l`` the ``method``'s final map at layer
  ``l`` (each already ReLU'd, resized and in [0, 1]), as the package's ``RefineCAM`` with
  ``base_method`` = that method (default Grad-CAM++, the package's). The package's loop meant to
  rescale each map to [0, 1] before the product changes nothing (it rebinds a loop variable);
  the maps are in [0, 1] already, so the product is the same.

  Args:
    model, variables, images ``[B, H, W, C]``: as :func:`explain`.
    target_layers: two or more layers, as ``explain``'s ``target_layer`` each.
    method: a name of ``EXPLAIN_METHODS``.
    targets: int ``[B]`` or None (each layer's call takes the argmax, the same for all).
    **explain_kwargs: passed to every ``explain`` call (``logits_fn``, ``eigen_smooth``,
      ``reshape_transform``, model call arguments...).
  Returns:
    ``(maps float32 [B, H, W] in [0, 1], targets int32 [B])``.
  """
  if isinstance(target_layers, str) or len(target_layers) < 1:
    raise ValueError(
      f'target_layers must be a list of layers (RefineCAM multiplies their maps), got '
      f'{target_layers!r}'
    )
  product, out_targets = None, None
  for layer in target_layers:
    maps, t = explain(model, variables, images, layer, (method,), targets, **explain_kwargs)
    product = maps[method] if product is None else product * maps[method]
    out_targets = t if out_targets is None else out_targets
  return scale_cam_image(product), out_targets
