"""The activation/gradient formulas of pytorch-grad-cam 1.5.7 that ``methods.py`` lacks.

Every function takes channel-last activations ``acts [B, h, w, C]`` (after any
``reshape_transform``) and, where the method needs them, ``grads [B, h, w, C]`` (d score / d
acts), and returns the raw map float32 ``[B, h, w]`` before ReLU and normalization, as that
package's ``get_cam_image`` does. The formulas were read from its 1.5.7 source; the code is ours.

Methods that weight channels (``weights [B, C]``) share ``weighted_map``: the weighted activations
are summed over channels, or projected on their first principal component with ``eigen_smooth``
(pytorch-grad-cam's ``get_2d_projection``), and ``truncate_negative_weights`` clamps the weights
first (the paper's sigmoid-branch rule).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dualsig_jax.cam.methods import at_least_f32

_HI = jax.lax.Precision.HIGHEST  # f32 matmuls on accelerators too: the maps feed thresholds
_SCORECAM_EPS = 1e-8  # ScoreCAM's per-channel min-max
KPCA_KERNELS = ('sigmoid', 'rbf', 'linear', 'poly', 'cosine')


def first_component(x: jax.Array) -> jax.Array:
  """pytorch-grad-cam's ``get_2d_projection``: per image, the centred ``[h*w, C]`` matrix
  projected on its first right singular vector.

  The sign of a singular vector is arbitrary (LAPACK's choice, in the package as here), so a map
  may come out negated relative to another implementation; NaNs count as 0 as in the package.

  Args: x float ``[B, h, w, C]``. Returns float32 ``[B, h, w]``.
  """
  b, h, w, c = x.shape
  flat = jnp.nan_to_num(at_least_f32(x), nan=0.0).reshape(b, h * w, c)
  flat = flat - jnp.mean(flat, axis=1, keepdims=True)
  _, _, vt = jnp.linalg.svd(flat, full_matrices=False)
  proj = jnp.einsum('bnc,bc->bn', flat, vt[:, 0, :], precision=_HI)
  return proj.reshape(b, h, w)


def weighted_map(
  acts: jax.Array, weights: jax.Array, *, eigen_smooth: bool = False, truncate: bool = False
) -> jax.Array:
  """``BaseCAM.get_cam_image``: ``sum_c w[b, c] A[b, :, :, c]`` or its ``eigen_smooth`` form.

  Args: acts float ``[B, h, w, C]``; weights float ``[B, C]``. Returns float32 ``[B, h, w]``.
  """
  w = at_least_f32(weights)
  if truncate:
    w = jnp.maximum(w, 0.0)
  weighted = at_least_f32(acts) * w[:, None, None, :]
  return first_component(weighted) if eigen_smooth else jnp.sum(weighted, axis=-1)


def _sum_or_project(x: jax.Array, eigen_smooth: bool) -> jax.Array:
  return first_component(x) if eigen_smooth else jnp.sum(at_least_f32(x), axis=-1)


def hirescam(acts, grads, *, eigen_smooth: bool = False) -> jax.Array:
  """HiResCAM (Draelos & Carin 2020): ``sum_c g_c * A_c`` element-wise. ``[B, h, w]``."""
  return _sum_or_project(at_least_f32(grads) * at_least_f32(acts), eigen_smooth)


def gradcam_elementwise(acts, grads, *, eigen_smooth: bool = False) -> jax.Array:
  """GradCAMElementWise: ``sum_c ReLU(g_c * A_c)``. ``[B, h, w]``."""
  prod = at_least_f32(grads) * at_least_f32(acts)
  return _sum_or_project(jnp.maximum(prod, 0.0), eigen_smooth)


def layercam(acts, grads, *, eigen_smooth: bool = False) -> jax.Array:
  """LayerCAM with the package's ``eigen_smooth``: ``sum_c ReLU(g_c) * A_c``. ``[B, h, w]``."""
  prod = jnp.maximum(at_least_f32(grads), 0.0) * at_least_f32(acts)
  return _sum_or_project(prod, eigen_smooth)


def eigencam(acts) -> jax.Array:
  """EigenCAM (Muhammad & Yeasin 2020): first principal component of the activations."""
  return first_component(acts)


def eigengradcam(acts, grads) -> jax.Array:
  """EigenGradCAM: first principal component of ``g * A``. ``[B, h, w]``."""
  return first_component(at_least_f32(grads) * at_least_f32(acts))


def _kernel(x: jax.Array, kind: str, gamma: float) -> jax.Array:
  """scikit-learn's pairwise kernels (``degree=3``, ``coef0=1``) on ``x [B, n, C]``."""
  dot = jnp.einsum('bnc,bmc->bnm', x, x, precision=_HI)
  if kind == 'linear':
    return dot
  if kind == 'sigmoid':
    return jnp.tanh(gamma * dot + 1.0)
  if kind == 'poly':
    return (gamma * dot + 1.0) ** 3
  sq = jnp.einsum('bnc,bnc->bn', x, x, precision=_HI)
  if kind == 'rbf':
    d2 = jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * dot, 0.0)
    return jnp.exp(-gamma * d2)
  norm = jnp.sqrt(sq)
  norm = jnp.where(norm == 0, 1.0, norm)
  return dot / (norm[:, :, None] * norm[:, None, :])


def kpca_cam(acts, *, kernel: str = 'sigmoid', gamma: float | None = None) -> jax.Array:
  """KPCA-CAM: the first kernel principal component of the centred activations.

  As ``sklearn.decomposition.KernelPCA(n_components=1, kernel, gamma)`` in the package:
  ``gamma=None`` is ``1 / C``; the centred kernel's top eigenvector ``v`` (sign flipped so that
  its largest-magnitude entry is positive, scikit-learn's ``svd_flip``) times ``sqrt(lambda)``.

  Args: acts float ``[B, h, w, C]``. Returns float32 ``[B, h, w]``.
  """
  if kernel not in KPCA_KERNELS:
    raise ValueError(f'unknown KPCA kernel {kernel!r}; valid: {KPCA_KERNELS}')
  b, h, w, c = acts.shape
  x = jnp.nan_to_num(at_least_f32(acts), nan=0.0).reshape(b, h * w, c)
  x = x - jnp.mean(x, axis=1, keepdims=True)
  k = _kernel(x, kernel, 1.0 / c if gamma is None else float(gamma))
  # KernelCenterer: K - row means - column means + grand mean.
  k = (
    k
    - jnp.mean(k, axis=1, keepdims=True)
    - jnp.mean(k, axis=2, keepdims=True)
    + jnp.mean(k, axis=(1, 2), keepdims=True)
  )
  vals, vecs = jnp.linalg.eigh(k)
  lam, v = jnp.maximum(vals[:, -1], 0.0), vecs[:, :, -1]
  top = jnp.take_along_axis(v, jnp.argmax(jnp.abs(v), axis=1)[:, None], axis=1)
  v = v * jnp.where(top < 0, -1.0, 1.0)
  return (v * jnp.sqrt(lam)[:, None]).reshape(b, h, w)


def fem(acts, *, k: float = 2.0) -> jax.Array:
  """FEM (Fuad et al. 2020): channel weight = fraction of pixels above ``mean + k * std``.

  The std is the population one (``ddof=0``), as ``np.std``. Returns float32 ``[B, h, w]``.
  """
  a = at_least_f32(acts)
  th = jnp.mean(a, axis=(1, 2), keepdims=True) + k * jnp.std(a, axis=(1, 2), keepdims=True)
  weights = jnp.mean((a > th).astype(jnp.float32), axis=(1, 2))
  return jnp.sum(a * weights[:, None, None, :], axis=-1)


def shapley_weights(grads, hvp) -> jax.Array:
  """ShapleyCAM (Cai 2025) channel weights: ``mean_ij(g - 0.5 * H A)``; ``[B, C]``.

  ``hvp [B, h, w, C]`` is the Hessian of the score w.r.t. the activations times the activations.
  """
  return jnp.mean(at_least_f32(grads) - 0.5 * at_least_f32(hvp), axis=(1, 2))


def finer_target_score(
  logits: jax.Array, main: jax.Array, comparisons: jax.Array, alpha: float
) -> jax.Array:
  """FinerCAM's ``FinerWeightedTarget``: per image ``sum_j p_j (y_main - alpha y_j) / sum_j p_j``.

  ``p = softmax(logits)``, ``j`` over the comparison classes; the denominator gets ``+1e-9``.
  Args: logits ``[B, K]``; main int ``[B]``; comparisons int ``[B, J]``. Returns ``[B]``.
  """
  logits = at_least_f32(logits)
  prob = jax.nn.softmax(logits, axis=-1)
  y_main = jnp.take_along_axis(logits, main[:, None], axis=1)
  y_cmp = jnp.take_along_axis(logits, comparisons, axis=1)
  p_cmp = jnp.take_along_axis(prob, comparisons, axis=1)
  num = jnp.sum(p_cmp * (y_main - alpha * y_cmp), axis=1)
  return num / (jnp.sum(p_cmp, axis=1) + 1e-9)


def finer_classes(logits: jax.Array, main: jax.Array | None, positions: tuple[int, ...]):
  """FinerCAM's classes: ``main`` (default the argmax) and, for each position ``p`` in
  ``positions``, the class whose logit is the ``p``-th closest to the main class's logit.

  Returns ``(main int32 [B], comparisons int32 [B, J])``; positions past ``K - 1`` are dropped
  as in the package.
  """
  k = logits.shape[-1]
  positions = tuple(p for p in positions if p < k)
  ref = (
    jnp.max(logits, axis=-1)
    if main is None
    else jnp.take_along_axis(logits, main[:, None], axis=1)[:, 0]
  )
  order = jnp.argsort(jnp.abs(logits - ref[:, None]), axis=-1, stable=True)
  main = order[:, 0] if main is None else main
  return main.astype(jnp.int32), order[:, list(positions)].astype(jnp.int32)


def bilinear_align_corners_matrix(in_size: int, out_size: int) -> jax.Array:
  """``[out, in]`` matrix of ``torch.nn.UpsamplingBilinear2d`` (``align_corners=True``), 1-D."""
  if out_size == 1 or in_size == 1:
    m = jnp.zeros((out_size, in_size), jnp.float32)
    return m.at[:, 0].set(1.0)
  pos = jnp.arange(out_size, dtype=jnp.float32) * jnp.float32((in_size - 1) / (out_size - 1))
  lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, in_size - 1)
  hi = jnp.minimum(lo + 1, in_size - 1)
  t = pos - at_least_f32(lo)
  return jax.nn.one_hot(lo, in_size) * (1.0 - t)[:, None] + jax.nn.one_hot(hi, in_size) * t[:, None]


def upsample_channels(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """ScoreCAM's masks: ``[N, h, w]`` upsampled (bilinear, align_corners) to ``size`` and
  min-max normalized per map with eps 1e-8. Returns float32 ``[N, H, W]``."""
  ry = bilinear_align_corners_matrix(maps.shape[1], size[0])
  rx = bilinear_align_corners_matrix(maps.shape[2], size[1])
  up = jnp.einsum('Hh,nhw,Ww->nHW', ry, at_least_f32(maps), rx, precision=_HI)
  lo = jnp.min(up, axis=(1, 2), keepdims=True)
  hi = jnp.max(up, axis=(1, 2), keepdims=True)
  return (up - lo) / (hi - lo + _SCORECAM_EPS)


def seg_eigen_cam(acts, grads) -> jax.Array:
  """SegEigenCAM (Chung & Ying 2025): the first principal component of ``|g| * A``, its sign
  chosen so that the larger magnitude is positive (``|min| > |max|`` flips it), as the package's
  ``get_2d_projection_with_sign_correction``. Args ``[B, h, w, C]``; returns ``[B, h, w]``."""
  proj = first_component(jnp.abs(grads.astype(jnp.float32)) * acts.astype(jnp.float32))
  lo = jnp.min(proj, axis=(1, 2), keepdims=True)
  hi = jnp.max(proj, axis=(1, 2), keepdims=True)
  return jnp.where(jnp.abs(lo) > jnp.abs(hi), -proj, proj)
