"""Deep Feature Factorization (Collins et al., ECCV 2018) as pytorch-grad-cam 1.5.7 runs it:
non-negative matrix factorization of a layer's activations into ``k`` concepts, each with a
map per image and, through the model's head, a score per class.

The activations ``[B, h, w, C]`` become ``X [C, B*h*w]`` (NaN -> 0), shifted per channel to a
minimum of 0. ``X ~ W H`` with ``W [C, k] >= 0`` (the concepts, the shift added back) and
``H [k, B*h*w] >= 0`` (the concept maps). The factorization is scikit-learn's ``NMF(k,
init='random', random_state=0)``: the same initialization, drawn with NumPy's RandomState, and
the same coordinate-descent solver (``_update_cdnmf_fast``: components in order, each one a
closed-form non-negative step of every row; stop when the summed projected gradient falls to
``tol`` times the first iteration's, at most ``max_iter`` iterations), written in JAX. Its sums
run in another order than scikit-learn's BLAS, so the two solutions drift apart by float32
rounding over the iterations: equal to a tolerance, not bit for bit (see the parity test).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dualsig_jax.cam.resize import resize_maps
from dualsig_jax.cam.target_layer import layer_forward

_SCALE_EPS = 1e-7  # scale_cam_image


def nmf_init(x: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's ``init='random'``: ``|N(0, 1)| * sqrt(mean(X) / k)``, H drawn first.

  Args: x float32 ``[n, m]`` (non-negative). Returns float32 ``W [n, k]``, ``H [k, m]``.
  """
  n, m = x.shape
  avg = np.sqrt(x.mean() / k)
  rng = np.random.RandomState(seed)
  h = avg * rng.standard_normal(size=(k, m)).astype(x.dtype, copy=False)
  w = avg * rng.standard_normal(size=(n, k)).astype(x.dtype, copy=False)
  return np.abs(w), np.abs(h)


def _cd_sweep(w: jax.Array, hht: jax.Array, xht: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One pass over the components of ``_update_cdnmf_fast`` for every row of ``w`` at once (the
  rows do not interact within a component). Returns (w, summed |projected gradient|)."""
  violation = jnp.float32(0.0)
  for t in range(w.shape[1]):
    grad = w @ hht[t] - xht[:, t]
    col = w[:, t]
    pg = jnp.where(col == 0, jnp.minimum(grad, 0.0), grad)
    violation = violation + jnp.sum(jnp.abs(pg))
    hess = hht[t, t]
    step = jnp.maximum(col - grad / jnp.where(hess != 0, hess, 1.0), 0.0)
    w = w.at[:, t].set(jnp.where(hess != 0, step, col))
  return w, violation


@functools.partial(jax.jit, static_argnames=('max_iter',))
def nmf(x, w, h, *, tol: float = 1e-4, max_iter: int = 200):
  """scikit-learn's coordinate-descent NMF (Frobenius loss, no regularization, no shuffle).

  Args: x float32 ``[n, m]`` >= 0; w ``[n, k]``, h ``[k, m]`` the start (:func:`nmf_init`).
  Returns: ``(w [n, k], h [k, m], iterations int32)``.
  """
  hi = jax.lax.Precision.HIGHEST

  def sweep(a, b, target):  # update a (rows) with b fixed: target ~ a @ b.T
    return _cd_sweep(a, jnp.dot(b.T, b, precision=hi), jnp.dot(target, b, precision=hi))

  def body(carry):
    w, ht, it, v0, _ = carry
    w, v_w = sweep(w, ht, x)
    ht, v_h = sweep(ht, w, x.T)
    v = v_w + v_h
    v0 = jnp.where(it == 0, v, v0)
    return w, ht, it + 1, v0, v

  def cond(carry):
    _, _, it, v0, v = carry
    done = (it > 0) & ((v0 == 0) | (v / jnp.where(v0 == 0, 1.0, v0) <= tol))
    return (it < max_iter) & ~done

  zero = jnp.float32(0.0)
  w, ht, it, _, _ = jax.lax.while_loop(cond, body, (w, h.T, jnp.int32(0), zero, zero))
  return w, ht.T, it


def deep_feature_factorization(
  model,
  variables,
  images: jax.Array,
  target_layer,
  n_components: int = 16,
  *,
  concept_scores_fn: Callable | None = None,
  reshape_transform: Callable | None = None,
  seed: int = 0,
  tol: float = 1e-4,
  max_iter: int = 200,
  **call_kwargs,
):
  """Deep Feature Factorization of ``target_layer``'s activations (the package's
  ``DeepFeatureFactorization(model, target_layer, reshape_transform, computation_on_concepts)``
  called with ``n_components``).

  Args:
    model, variables, images ``[B, H, W, 3]``, target_layer, reshape_transform,
      **call_kwargs: as :func:`dualsig_jax.cam.explain`.
    n_components: k, the number of concepts.
    concept_scores_fn: ``concepts [k, C] -> scores [k, K]``, e.g. the classifier head on a
      concept's embedding (the package's ``computation_on_concepts``); for this project's models
      ``lambda c: c @ w + b`` with ``(w, b) = models.head_weights(variables, 'softmax')``.
    seed: the initialization's RandomState seed (the package's ``random_state=0``).
    tol, max_iter: the solver's (scikit-learn's defaults).
  Returns:
    ``concepts`` float32 ``[C, k]``, ``maps`` float32 ``[B, k, H, W]`` (each concept's map per
    image, min-max scaled to [0, 1] then resized as ``scale_cam_image``: cv2's bilinear), and
    with ``concept_scores_fn`` also ``scores [k, K]``.
  """
  forward, state = layer_forward(model, variables, target_layer, call_kwargs=call_kwargs)
  acts = jax.jit(lambda s, x: forward(s, x, None)[1], static_argnums=())(state, images)
  if reshape_transform is not None:
    acts = reshape_transform(acts)
  if acts.ndim != 4:
    raise ValueError(
      f'the target layer gives shape {tuple(acts.shape)}, not [B, h, w, C]: pass reshape_transform'
    )
  b, h, w, c = acts.shape
  x = np.nan_to_num(np.asarray(acts, np.float32), nan=0.0)
  x = np.ascontiguousarray(x.transpose(3, 0, 1, 2).reshape(c, -1))  # [C, B*h*w]
  offset = x.min(axis=1)
  x = x - offset[:, None]
  w0, h0 = nmf_init(x, int(n_components), seed)
  wf, hf, _ = nmf(jnp.asarray(x), jnp.asarray(w0), jnp.asarray(h0), tol=tol, max_iter=max_iter)
  concepts = wf + jnp.asarray(offset)[:, None]
  maps = hf.reshape(n_components, b, h, w).transpose(1, 0, 2, 3).reshape(b * n_components, h, w)
  maps = maps - jnp.min(maps, axis=(1, 2), keepdims=True)
  maps = maps / (_SCALE_EPS + jnp.max(maps, axis=(1, 2), keepdims=True))
  size = tuple(int(v) for v in images.shape[1:3])
  maps = resize_maps(maps, size, 'linear').reshape(b, n_components, *size)
  if concept_scores_fn is None:
    return concepts, maps
  return concepts, maps, concept_scores_fn(concepts.T)
