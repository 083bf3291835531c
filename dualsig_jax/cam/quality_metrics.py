"""pytorch-grad-cam 1.5.7's map-quality metrics of ``metrics/arcc.py`` (Complexity, Coherency and
their combination with ROAD, ARCC), batched in JAX; formulas read from the package.

* ``complexity``: the mean |map| (0: empty, 1: everywhere).
* ``coherency``: ``(pearson(map of image * map, map) + 1) / 2``: a map that survives masking
  the image with itself is coherent.
* ``arcc``: ``3 / (1 / coherency + 1 / (1 - complexity) + 1 / road)`` (each term + 1e-8), the
  harmonic mean, ``road`` = ``clip(2 * ROADCombined, 0, 1)`` over percentiles 20, 40, 60, 80.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dualsig_jax.cam.explain import explain
from dualsig_jax.cam.road_metrics import road_combined

_EPS = 1e-8  # the package's, in the Pearson denominator and each ARCC term
ARCC_PERCENTILES = (20, 40, 60, 80)


def complexity(maps: jax.Array) -> jax.Array:
  """The package's ``Complexity``: mean |map| per image. maps float ``[B, H, W]`` -> ``[B]``."""
  flat = jnp.abs(maps.astype(jnp.float32)).reshape(maps.shape[0], -1)
  return jnp.sum(flat, axis=1) / flat.shape[1]


def pearson(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-image Pearson correlation (``n - 1`` normalisation, ``+ 1e-8`` on the product of the
  standard deviations, as ``batch_pearson_coherency``). ``[B, ...]`` x2 -> float32 ``[B]``."""
  a = a.astype(jnp.float32).reshape(a.shape[0], -1)
  b = b.astype(jnp.float32).reshape(b.shape[0], -1)
  n = a.shape[1]
  ac = a - jnp.mean(a, axis=1, keepdims=True)
  bc = b - jnp.mean(b, axis=1, keepdims=True)
  cov = jnp.sum(ac * bc, axis=1) / (n - 1)
  sa = jnp.sqrt(jnp.sum(ac * ac, axis=1) / (n - 1))
  sb = jnp.sqrt(jnp.sum(bc * bc, axis=1) / (n - 1))
  return cov / (sa * sb + _EPS)


def coherency(
  model,
  variables,
  images: jax.Array,
  maps: jax.Array,
  targets: jax.Array,
  *,
  target_layer,
  method: str = 'gradcam',
  **explain_kwargs,
) -> jax.Array:
  """The package's ``Coherency``: ``(pearson(explain(image * map), map) + 1) / 2``, the second
  map by ``method`` at ``target_layer`` (the package's ``base_method``) for the same targets.

  Args: images ``[B, H, W, C]``, maps ``[B, H, W]`` (e.g. from :func:`explain`), targets int
  ``[B]``; ``**explain_kwargs`` as :func:`explain`'s. Returns float32 ``[B]`` in [0, 1].
  """
  targets = jnp.asarray(targets, jnp.int32)
  mixed = images * maps[..., None].astype(images.dtype)
  again, _ = explain(model, variables, mixed, target_layer, (method,), targets, **explain_kwargs)
  return (pearson(again[method], maps) + 1.0) / 2.0


def arcc(
  model,
  variables,
  images: jax.Array,
  maps: jax.Array,
  targets: jax.Array,
  *,
  target_layer,
  method: str = 'gradcam',
  road_percentiles=ARCC_PERCENTILES,
  noise: float = 0.01,
  seed: int = 0,
  activation: str = 'logit',
  logits_fn=None,
  explain_options: dict | None = None,
  **call_kwargs,
) -> jax.Array:
  """The package's ``ARCC``: the harmonic mean of coherency, ``1 - complexity`` and ROAD.

  Args:
    images ``[B, H, W, C]``, maps ``[B, H, W]``, targets int ``[B]``.
    target_layer, method: the coherency's second map (the package's ``base_method``).
    road_percentiles, noise, seed, activation: ``road_combined``'s (noise = the imputer's 0.01).
    logits_fn, **call_kwargs: the model's logits and call arguments, for both.
    explain_options: further :func:`explain` arguments for the coherency map.
  Returns:
    float32 ``[B]``.
  """
  cx = complexity(maps)
  coh = coherency(
    model,
    variables,
    images,
    maps,
    targets,
    target_layer=target_layer,
    method=method,
    logits_fn=logits_fn,
    **(explain_options or {}),
    **call_kwargs,
  )
  rd = road_combined(
    model,
    variables,
    images,
    maps,
    targets,
    percentiles=tuple(road_percentiles),
    noise=noise,
    seed=seed,
    activation=activation,
    logits_fn=logits_fn,
    **call_kwargs,
  )
  rd = jnp.clip(rd * 2.0, 0.0, 1.0)
  return 3.0 / (1.0 / (coh + _EPS) + 1.0 / ((1.0 - cx) + _EPS) + 1.0 / (rd + _EPS))
