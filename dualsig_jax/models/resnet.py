"""ResNet trunks (wsolevaluation's ResNetCam layout) and their specs: ResNet50, ``resnet_tiny``,
and ResNet18 / ResNet34 (torchvision's BasicBlock).

torchvision's layout (v1.5: the stride sits on the 3x3 conv), key names ``conv1``, ``bn1``,
``layer{1..4}.<i>.{conv1,bn1,conv2,bn2[,conv3,bn3]}``, ``layer{..}.0.downsample.{0,1}``, ``fc``
plus the sigmoid head ``fc2``. As in wsolevaluation's ResNetCam, layer4 has stride 1 (14x14
features at 224) and ``large_feature_map`` also sets layer3's stride to 1 (28x28). The
reference's standard family (wsol/resnet.py) has the same layout: both families use one spec.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dualsig_jax.models import spec as S
from dualsig_jax.models.layers import max_pool, torch_batchnorm, torch_conv


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
  expansion = 4

  @nn.compact
  def __call__(self, x):
    out_ch = self.planes * self.expansion
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


class BasicBlock(nn.Module):
  """torchvision BasicBlock (expansion 1): 3x3 conv (strided) -> BN -> ReLU -> 3x3 conv -> BN,
  plus the identity or a 1x1 downsample, -> ReLU."""

  planes: int
  stride: int
  frozen_bn: bool
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x):
    conv = lambda s, name: torch_conv(
      self.planes, 3, stride=s, padding=1, use_bias=False, dtype=self.dtype, name=name
    )
    bn = lambda name: torch_batchnorm(self.frozen_bn, dtype=self.dtype, name=name)
    y = nn.relu(bn('bn1')(conv(self.stride, 'conv1')(x)))
    y = bn('bn2')(conv(1, 'conv2')(y))
    identity = x
    if self.stride != 1 or x.shape[-1] != self.planes:
      identity = Downsample(
        self.planes, self.stride, self.frozen_bn, self.dtype, name='downsample'
      )(x)
    return nn.relu(y + identity)


BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


class ResLayer(nn.Module):
  """torch ``layerN``: blocks named ``'0'``, ``'1'``, ..., the first one strided."""

  planes: int
  blocks: int
  stride: int
  frozen_bn: bool
  dtype: Any = jnp.float32
  block: str = 'bottleneck'

  @nn.compact
  def __call__(self, x):
    for i in range(self.blocks):
      x = BLOCKS[self.block](
        self.planes, self.stride if i == 0 else 1, self.frozen_bn, self.dtype, name=str(i)
      )(x)
    return x


class ResNetTrunk(nn.Module):
  """ResNet-CAM's trunk: stem -> layer1..4; ``__call__(x [B,H,W,3], train=False)`` ->
  ``[B, h, w, expansion * planes[3]]``. BatchNorm normalises with the batch statistics when
  ``train`` (also in the dual stage, as the reference's does after ``model.train()``; the
  caller then discards the updated running statistics) and with the running ones otherwise.
  """

  blocks: tuple = (3, 4, 6, 3)
  planes: tuple = (64, 128, 256, 512)
  stem_width: int = 64
  block: str = 'bottleneck'
  large_feature_map: bool = False
  dtype: Any = jnp.float32

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
      x = ResLayer(p, n, s, frozen, self.dtype, self.block, name=f'layer{i + 1}')(x)
    return x


def spec(
  blocks: tuple,
  planes: tuple = (64, 128, 256, 512),
  stem_width: int = 64,
  block: str = 'bottleneck',
  torchvision_file: str | None = None,
) -> S.BackboneSpec:
  """A ResNet of both families: GAP + Linear heads; main.py's lr rule for ResNets (a torch name
  containing 'layer4.' or 'fc.' is a classifier parameter, so fc2 is a feature one)."""
  return S.BackboneSpec(
    trunk=lambda lfm, dtype, rate: ResNetTrunk(blocks, planes, stem_width, block, lfm, dtype),
    head=S.dense_head(S.linear_init),
    head_kind='linear',
    head_init=S.linear_init,
    lr_patterns=('layer4.', 'fc.'),
    lr_on_match='classifier',
    # torchvision's file differs only by its 1000-class fc (dropped when K differs).
    torch_layout=S.TorchLayout(torchvision_file=torchvision_file or '', new=('fc.', 'fc2.')),
  )
