"""The reference's "standard" models (its ``wsol/`` package), used by every gradient method.

- ``VGGStandard``: torchvision VGG16's convs without the last max-pool (14x14 features at 224;
  ``large_feature_map`` also drops the 4th pool: 28x28), ``AdaptiveAvgPool2d((7, 7))``, torch's
  C-major flatten and torchvision's classifier MLP (Linear 25088->4096, ReLU, Dropout,
  Linear 4096->4096, ReLU, Dropout, Linear 4096->K). The sigmoid head is a second MLP of the
  same shape. Torch names: ``features.<i>``, ``classifier.{0,3,6}``, ``classifier_2.{0,3,6}``;
  Flax names: ``features/<i>``, ``fc/{0,3,6}``, ``fc2/{0,3,6}``.
- ``InceptionStandard``: torchvision's Inception3 (``transform_input=False``, no aux logits)
  through ``Mixed_7c`` (2048 channels; 5x5 at 224, 8x8 at 299), ``AdaptiveAvgPool2d(1)``,
  dropout, Linear heads ``fc`` / ``fc2``. As in the reference, ``large_feature_map`` changes
  nothing here.
- The standard ResNet50 is ``resnet.ResNetCam`` itself (same layout, separate checkpoints).

Output contract as everywhere in this package: ``apply(variables, x [B,H,W,3], train)`` ->
``{'features', 'softmax_logits', 'sigmoid_logits'}`` (float32); ``method='head'`` is the pure
head from the features (no stop-gradient, no dropout).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualsig_jax.models.inception import (
  BasicConv2d,
  InceptionA,
  InceptionB,
  InceptionBlock,
  InceptionC,
)
from dualsig_jax.models.layers import (
  adaptive_avg_pool,
  avg_pool_3x3_same,
  global_avg_pool,
  head_inits,
  max_pool,
  torch_flatten,
)
from dualsig_jax.models.vgg import VGG16_CFG, VGGFeatures


def _outputs(features, soft, sig) -> dict[str, jax.Array]:
  return {
    'features': features.astype(jnp.float32),
    'softmax_logits': soft.astype(jnp.float32),
    'sigmoid_logits': sig.astype(jnp.float32),
  }


class MLPHead(nn.Module):
  """torch ``nn.Sequential(Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear)``; the Dense
  layers are named by their Sequential index ``'0'``, ``'3'``, ``'6'``.

  ``__call__(x [B, D], train=False)`` -> ``[B, num_classes]``. Fresh layers follow the
  reference: N(0, 0.01) weights, zero bias.
  """

  num_classes: int
  hidden: int = 4096
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    kernel_init, bias_init = head_inits('vgg', 'standard', x.shape[-1])

    def dense(features, name):
      return nn.Dense(
        features,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        bias_init=bias_init,
        name=name,
      )

    drop = lambda y: nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    x = drop(nn.relu(dense(self.hidden, '0')(x)))
    x = drop(nn.relu(dense(self.hidden, '3')(x)))
    return dense(self.num_classes, '6')(x)


class VGGStandard(nn.Module):
  """Standard VGG: features -> AdaptiveAvgPool(pool_size) -> flatten -> MLP ``fc`` / ``fc2``.

  ``__call__(x [B,H,W,3] float32, train=False)`` -> dict with ``features`` ``[B,h,w,C]`` (the
  last conv's ReLU output, the reference's Grad-CAM target ``features[-1]``) and
  ``softmax_logits`` / ``sigmoid_logits`` ``[B,K]`` (all float32). Dropout (in both MLPs)
  is active only when ``train=True`` and then needs a ``'dropout'`` rng.
  """

  num_classes: int
  cfg: tuple = VGG16_CFG
  hidden: int = 4096
  pool_size: int = 7
  dropout_rate: float = 0.5
  frozen_backbone: bool = True
  dtype: Any = jnp.float32
  arch: str = 'vgg16'  # only used to name the model in error messages
  family = 'standard'

  def setup(self):
    self.features = VGGFeatures(self.cfg, dtype=self.dtype)
    mlp = lambda: MLPHead(self.num_classes, self.hidden, self.dropout_rate, self.dtype)
    self.fc = mlp()
    self.fc2 = mlp()

  def _flat(self, features):
    return torch_flatten(adaptive_avg_pool(features.astype(self.dtype), self.pool_size))

  def head(self, features: jax.Array) -> dict[str, jax.Array]:
    """Pure head: ``features [B, h, w, C]`` -> logits ``[B, K]`` float32 (no dropout)."""
    flat = self._flat(features)
    return {
      'softmax_logits': self.fc(flat).astype(jnp.float32),
      'sigmoid_logits': self.fc2(flat).astype(jnp.float32),
    }

  def __call__(self, x, train: bool = False):
    feats = self.features(x.astype(self.dtype))
    if self.frozen_backbone:
      feats = jax.lax.stop_gradient(feats)
    flat = self._flat(feats)
    soft = self.fc(flat, train)
    if self.frozen_backbone:
      soft = jax.lax.stop_gradient(soft)
    return _outputs(feats, soft, self.fc2(flat, train))


class InceptionD(InceptionBlock):
  """torchvision InceptionD (``Mixed_7a``): stride-2 reduction to 1280 channels."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv('branch3x3_2', 320, 3, 2)(self.conv('branch3x3_1', 192, 1)(x))
    b7 = self.conv('branch7x7x3_1', 192, 1)(x)
    b7 = self.conv('branch7x7x3_2', 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv('branch7x7x3_3', 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv('branch7x7x3_4', 192, 3, 2)(b7)
    return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class InceptionE(InceptionBlock):
  """torchvision InceptionE (``Mixed_7b`` / ``Mixed_7c``): 2048 output channels."""

  @nn.compact
  def __call__(self, x):
    b1 = self.conv('branch1x1', 320, 1)(x)
    b3 = self.conv('branch3x3_1', 384, 1)(x)
    b3 = jnp.concatenate(
      [
        self.conv('branch3x3_2a', 384, (1, 3), padding=(0, 1))(b3),
        self.conv('branch3x3_2b', 384, (3, 1), padding=(1, 0))(b3),
      ],
      axis=-1,
    )
    bd = self.conv('branch3x3dbl_1', 448, 1)(x)
    bd = self.conv('branch3x3dbl_2', 384, 3, padding=1)(bd)
    bd = jnp.concatenate(
      [
        self.conv('branch3x3dbl_3a', 384, (1, 3), padding=(0, 1))(bd),
        self.conv('branch3x3dbl_3b', 384, (3, 1), padding=(1, 0))(bd),
      ],
      axis=-1,
    )
    bp = self.conv('branch_pool', 192, 1)(avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionStandard(nn.Module):
  """torchvision Inception3 through ``Mixed_7c``, GAP, dropout, Linear ``fc`` / ``fc2``.

  ``__call__(x [B,H,W,3] float32, train=False)`` -> dict with ``features`` ``[B,h,w,2048]``
  (``Mixed_7c``, the reference's Grad-CAM target; 5x5 at 224), ``softmax_logits`` /
  ``sigmoid_logits`` ``[B,K]`` (float32). No input transformation (the reference builds it
  with ``transform_input=False``, also for torchvision's Google weights). BatchNorm uses batch
  statistics and dropout is on only when ``train=True``. Inputs need >= 75 px.
  """

  num_classes: int
  dropout_rate: float = 0.5
  frozen_backbone: bool = True
  dtype: Any = jnp.float32
  min_input_size = 96  # 75 is torchvision's minimum; init and shape probes use this

  def setup(self):
    kernel_init, bias_init = head_inits('inception', 'standard', 2048)
    dense = lambda: nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=kernel_init,
      bias_init=bias_init,
    )
    self.fc = dense()
    self.fc2 = dense()

  def head(self, features: jax.Array) -> dict[str, jax.Array]:
    """Pure head: ``features [B, h, w, 2048]`` -> logits ``[B, K]`` float32 (no dropout)."""
    pooled = global_avg_pool(features.astype(self.dtype))
    return {
      'softmax_logits': self.fc(pooled).astype(jnp.float32),
      'sigmoid_logits': self.fc2(pooled).astype(jnp.float32),
    }

  @nn.compact
  def __call__(self, x, train: bool = False):
    fb = not train  # BatchNorm mode: running statistics unless training
    d = self.dtype
    x = x.astype(d)
    x = BasicConv2d(32, 3, 2, 0, fb, d, name='Conv2d_1a_3x3')(x)
    x = BasicConv2d(32, 3, 1, 0, fb, d, name='Conv2d_2a_3x3')(x)
    x = BasicConv2d(64, 3, 1, 1, fb, d, name='Conv2d_2b_3x3')(x)
    x = max_pool(x, 3, 2)
    x = BasicConv2d(80, 1, 1, 0, fb, d, name='Conv2d_3b_1x1')(x)
    x = BasicConv2d(192, 3, 1, 0, fb, d, name='Conv2d_4a_3x3')(x)
    x = max_pool(x, 3, 2)
    x = InceptionA(fb, d, pool_features=32, name='Mixed_5b')(x)
    x = InceptionA(fb, d, pool_features=64, name='Mixed_5c')(x)
    x = InceptionA(fb, d, pool_features=64, name='Mixed_5d')(x)
    x = InceptionB(fb, d, stride=2, padding=0, pool_padding=0, name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(fb, d, channels_7x7=c7, name=name)(x)
    x = InceptionD(fb, d, name='Mixed_7a')(x)
    x = InceptionE(fb, d, name='Mixed_7b')(x)
    feats = InceptionE(fb, d, name='Mixed_7c')(x)
    if self.frozen_backbone:
      feats = jax.lax.stop_gradient(feats)
    pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(global_avg_pool(feats))
    soft = self.fc(pooled)
    if self.frozen_backbone:
      soft = jax.lax.stop_gradient(soft)
    return _outputs(feats, soft, self.fc2(pooled))
