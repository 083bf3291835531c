"""CAM-family formulas and the reference's map normalization, as pure batched jnp functions.

Every formula takes NHWC activations ``features [B, h, w, C]`` (and for the gradient methods
``grads [B, h, w, C]``, d score / d features) and returns the raw map ``[B, h, w]`` before any
ReLU or normalization; the weights follow pytorch-grad-cam (jacobgil) so maps match the
reference pipeline of Oh & Noh (BMVC 2025), which uses that library.

``truncate_negative_weights`` is the paper's ReLU on the channel weights (sigmoid branch): a
channel with a negative weight can then never raise the map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dualsig_jax import vocab

METHODS = vocab.CAM_METHODS
GRADIENT_METHODS = vocab.GRADIENT_METHODS

_GRADCAMPP_EPS = 1e-6  # pytorch-grad-cam GradCAMPlusPlus


def at_least_f32(x: jax.Array) -> jax.Array:
  """``x`` in float32, or float64 when it is float64: maps are float32 for float32 / bf16
  models, and float64 models keep float64 (finite-difference gradient checks)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


_XGRADCAM_EPS = 1e-7  # pytorch-grad-cam XGradCAM
_SCALE_EPS = 1e-7  # pytorch-grad-cam scale_cam_image


def linear_head_required(what: str) -> ValueError:
  """The error for ``method='cam'`` on a head that is not one linear layer.

  Plain CAM reads class weights straight off a linear head; through an MLP (the reference's
  standard VGG16) only gradient methods give maps. ``what`` names the head, e.g. ``'the
  sigmoid head of vgg16 (standard) is an MLP (classifier_2: 25088-4096-4096-200)'``.
  """
  names = ', '.join(GRADIENT_METHODS[:-1]) + ' or ' + GRADIENT_METHODS[-1]
  return ValueError(f'{what}; CAM needs a linear head: use {names}')


def check_method(method: str) -> str:
  """Return ``method`` or raise ``ValueError`` listing the valid names."""
  if method not in METHODS:
    raise ValueError(f'unknown CAM method {method!r}; valid: {METHODS}')
  return method


def _weighted_sum(features: jax.Array, weights: jax.Array, truncate: bool) -> jax.Array:
  """``sum_c w[b, c] * A[b, :, :, c]`` -> ``[B, h, w]``; ``weights [B, C]``."""
  if truncate:
    weights = jnp.maximum(weights, 0.0)
  hi = jax.lax.Precision.HIGHEST  # keep f32 on accelerators; the map feeds thresholds
  return jnp.einsum('bhwc,bc->bhw', at_least_f32(features), at_least_f32(weights), precision=hi)


def cam(
  features: jax.Array, class_weights: jax.Array, *, truncate_negative_weights: bool = False
) -> jax.Array:
  """Class Activation Mapping (Zhou et al., CVPR 2016): ``M = sum_c w_{k,c} A_c``.

  Args:
    features: float ``[B, h, w, C]`` last feature map (input of GAP).
    class_weights: float ``[B, C]``, the head weights of each image's target class
      (``w[:, targets].T`` for a Dense kernel ``w [C, K]``).
    truncate_negative_weights: apply ``ReLU`` to the weights first (the paper's sigmoid head).
  Returns:
    float32 ``[B, h, w]`` raw map. The reference averages over channels for VGG/ResNet and sums
    for Inception; the map is min-max normalized afterwards so the scale does not matter.
  """
  return _weighted_sum(features, class_weights, truncate_negative_weights)


def grad_cam_weights(grads: jax.Array) -> jax.Array:
  """Grad-CAM channel weights (Selvaraju et al., ICCV 2017): spatial mean of the gradient.

  Args: grads float ``[B, h, w, C]``. Returns float32 ``[B, C]``.
  """
  return jnp.mean(at_least_f32(grads), axis=(1, 2))


def grad_cam(
  features: jax.Array, grads: jax.Array, *, truncate_negative_weights: bool = False
) -> jax.Array:
  """Grad-CAM raw map ``sum_c mean_ij(dY/dA_c) A_c``.

  Args: features, grads float ``[B, h, w, C]``. Returns float32 ``[B, h, w]`` (pre-ReLU).
  """
  return _weighted_sum(features, grad_cam_weights(grads), truncate_negative_weights)


def grad_cam_plus_plus_weights(features: jax.Array, grads: jax.Array) -> jax.Array:
  """Grad-CAM++ weights (Chattopadhyay et al., WACV 2018, eq. 19 with exp-free scores).

  ``alpha = g^2 / (2 g^2 + sum_ij(A) g^3 + 1e-6)``, zero where ``g == 0``;
  ``w_c = sum_ij ReLU(g) * alpha`` (pytorch-grad-cam's GradCAMPlusPlus).

  Args: features, grads float ``[B, h, w, C]``. Returns float32 ``[B, C]``.
  """
  g = at_least_f32(grads)
  g2 = g * g
  g3 = g2 * g
  sum_a = jnp.sum(at_least_f32(features), axis=(1, 2), keepdims=True)
  alpha = g2 / (2.0 * g2 + sum_a * g3 + _GRADCAMPP_EPS)
  alpha = jnp.where(g != 0, alpha, 0.0)
  return jnp.sum(jnp.maximum(g, 0.0) * alpha, axis=(1, 2))


def grad_cam_plus_plus(
  features: jax.Array, grads: jax.Array, *, truncate_negative_weights: bool = False
) -> jax.Array:
  """Grad-CAM++ raw map. Args ``[B, h, w, C]``; returns float32 ``[B, h, w]`` (pre-ReLU)."""
  w = grad_cam_plus_plus_weights(features, grads)
  return _weighted_sum(features, w, truncate_negative_weights)


def xgrad_cam_weights(features: jax.Array, grads: jax.Array) -> jax.Array:
  """XGrad-CAM weights (Fu et al., BMVC 2020): ``sum_ij(g * A) / (sum_ij A + 1e-7)``.

  Args: features, grads float ``[B, h, w, C]``. Returns float32 ``[B, C]``.
  """
  a = at_least_f32(features)
  sum_a = jnp.sum(a, axis=(1, 2))
  return jnp.sum(at_least_f32(grads) * a, axis=(1, 2)) / (sum_a + _XGRADCAM_EPS)


def xgrad_cam(
  features: jax.Array, grads: jax.Array, *, truncate_negative_weights: bool = False
) -> jax.Array:
  """XGrad-CAM raw map. Args ``[B, h, w, C]``; returns float32 ``[B, h, w]`` (pre-ReLU)."""
  w = xgrad_cam_weights(features, grads)
  return _weighted_sum(features, w, truncate_negative_weights)


def layer_cam(
  features: jax.Array, grads: jax.Array, *, truncate_negative_weights: bool = False
) -> jax.Array:
  """LayerCAM (Jiang et al., IEEE TIP 2021): ``sum_c ReLU(g_c) * A_c`` per pixel.

  The element-wise weights ``ReLU(g)`` are never negative, so ``truncate_negative_weights``
  is accepted for a uniform signature and changes nothing.
  Args: features, grads float ``[B, h, w, C]``. Returns float32 ``[B, h, w]``.
  """
  del truncate_negative_weights
  return jnp.sum(jnp.maximum(at_least_f32(grads), 0.0) * at_least_f32(features), axis=-1)


GRADIENT_FORMULAS = {
  'gradcam': grad_cam,
  'gradcam++': grad_cam_plus_plus,
  'xgradcam': xgrad_cam,
  'layercam': layer_cam,
}


# ----------------------------------------------------------------------------- normalization


def normalize_scoremap(maps: jax.Array) -> jax.Array:
  """wsolevaluation's ``normalize_scoremap``, batched: per map min-max to [0, 1].

  A map containing any NaN, or a constant map, becomes all zeros.
  Args: maps float ``[B, H, W]``. Returns float32 ``[B, H, W]``.
  """
  maps = at_least_f32(maps)
  has_nan = jnp.any(jnp.isnan(maps), axis=(1, 2), keepdims=True)
  safe = jnp.where(has_nan, 0.0, maps)
  lo = jnp.min(safe, axis=(1, 2), keepdims=True)
  hi = jnp.max(safe, axis=(1, 2), keepdims=True)
  shifted = safe - lo
  rng = jnp.max(shifted, axis=(1, 2), keepdims=True)  # as the reference: (x - min) / max(x - min)
  bad = has_nan | (lo == hi)
  return jnp.where(bad, 0.0, shifted / jnp.where(bad, 1.0, rng))


def scale_cam_image(maps: jax.Array) -> jax.Array:
  """pytorch-grad-cam's ``scale_cam_image`` without resize: ``(x - min) / (1e-7 + max(x - min))``.

  Args: maps float ``[B, H, W]``. Returns float32 ``[B, H, W]``.
  """
  shifted = maps - jnp.min(maps, axis=(1, 2), keepdims=True)
  return shifted / (_SCALE_EPS + jnp.max(shifted, axis=(1, 2), keepdims=True))
