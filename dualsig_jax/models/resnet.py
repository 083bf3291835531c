"""ResNet50-CAM (wsolevaluation) and ``resnet_tiny``.

torchvision's ResNet50 layout (v1.5: the stride sits on the 3x3 conv of the Bottleneck),
key names ``conv1``, ``bn1``, ``layer{1..4}.<i>.{conv1,bn1,conv2,bn2,conv3,bn3}``,
``layer{..}.0.downsample.{0,1}``, ``fc`` plus the sigmoid head ``fc2``.
As in wsolevaluation's ResNetCam, layer4 has stride 1 (14x14 features at 224) and
``large_feature_map`` also sets layer3's stride to 1 (28x28).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dualsig_jax.models.layers import (
  DualHeadMixin,
  linear_head,
  max_pool,
  torch_batchnorm,
  torch_conv,
)

EXPANSION = 4


class Downsample(nn.Module):
  """``nn.Sequential(Conv2d 1x1 stride s, BatchNorm2d)`` -> children ``'0'`` and ``'1'``."""

  features: int
  stride: int
  frozen_bn: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = torch_conv(
      self.features, 1, stride=self.stride, use_bias=False, dtype=self.dtype, name='0'
    )(x)
    return torch_batchnorm(self.frozen_bn, dtype=self.dtype, name='1')(x)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (expansion 4, stride on conv2)."""

  planes: int
  stride: int
  frozen_bn: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    out_ch = self.planes * EXPANSION
    conv = lambda f, k, name, s=1, p=0: torch_conv(
      f, k, stride=s, padding=p, use_bias=False, dtype=self.dtype, name=name
    )
    bn = lambda name: torch_batchnorm(self.frozen_bn, dtype=self.dtype, name=name)
    y = nn.relu(bn('bn1')(conv(self.planes, 1, 'conv1')(x)))
    y = nn.relu(bn('bn2')(conv(self.planes, 3, 'conv2', self.stride, 1)(y)))
    y = bn('bn3')(conv(out_ch, 1, 'conv3')(y))
    identity = x
    if self.stride != 1 or x.shape[-1] != out_ch:
      identity = Downsample(out_ch, self.stride, self.frozen_bn, self.dtype, name='downsample')(x)
    return nn.relu(y + identity)


class ResLayer(nn.Module):
  """torch ``layerN``: blocks named ``'0'``, ``'1'``, ..., the first one strided."""

  planes: int
  blocks: int
  stride: int
  frozen_bn: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.blocks):
      x = Bottleneck(
        self.planes, self.stride if i == 0 else 1, self.frozen_bn, self.dtype, name=str(i)
      )(x)
    return x


class ResNetCam(DualHeadMixin, nn.Module):
  """ResNet-CAM: stem -> layer1..4 -> GAP -> fc / fc2.

  ``__call__(x [B,H,W,3] float32, train=False)`` -> dict with ``features`` ``[B,h,w,4*planes[3]]``,
  ``softmax_logits`` / ``sigmoid_logits`` ``[B,K]`` (float32). BatchNorm normalises with the
  batch statistics when ``train`` (also with ``frozen_backbone``, as the reference's dual stage
  does after ``model.train()``; the caller then discards the updated running statistics) and
  with the running statistics otherwise. The standard family's ResNet50 is this model too.
  """

  num_classes: int
  blocks: tuple = (3, 4, 6, 3)
  planes: tuple = (64, 128, 256, 512)
  stem_width: int = 64
  large_feature_map: bool = False
  frozen_backbone: bool = True
  dtype: Any = jnp.float32

  def setup(self):
    self.fc = linear_head(self.num_classes, self.dtype)
    self.fc2 = linear_head(self.num_classes, self.dtype)

  @nn.compact
  def __call__(self, x, train: bool = False):
    frozen = not train  # BatchNorm mode: running statistics unless training
    x = torch_conv(
      self.stem_width, 7, stride=2, padding=3, use_bias=False, dtype=self.dtype, name='conv1'
    )(x.astype(self.dtype))
    x = nn.relu(torch_batchnorm(frozen, dtype=self.dtype, name='bn1')(x))
    x = max_pool(x, 3, 2, 1)
    strides = (1, 2, 1 if self.large_feature_map else 2, 1)
    for i, (n, p, s) in enumerate(zip(self.blocks, self.planes, strides)):
      x = ResLayer(p, n, s, frozen, self.dtype, name=f'layer{i + 1}')(x)
    return self._outputs(x)
