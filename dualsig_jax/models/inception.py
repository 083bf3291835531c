"""InceptionV3-CAM exactly as wsolevaluation's ``InceptionCam``.

Differences from torchvision's InceptionV3 that matter for weight import (key names are
unchanged, so torchvision's ``inception_v3_google`` file loads up to ``Mixed_6e``):
``Conv2d_1a_3x3`` has padding 1; the two stem max-pools are 3x3/2, padding 1, ceil_mode;
an extra 3x3/2 ceil-mode pool precedes ``Mixed_6a`` (dropped with ``large_feature_map``);
``Mixed_6a`` runs with stride 1 / padding 1. Head: dropout, ``SPG_A3_1b`` (3x3 768->1024
+ ReLU), dropout, ``SPG_A3_2b`` (3x3 1024->1024 + ReLU) = the CAM features, dropout, then a
1x1 conv (``SPG_A4`` in torch, ``fc`` here; ``SPG_A4_2`` / ``fc2`` for the sigmoid branch)
and GAP. Dropout (p=0.5) is active only when ``train=True`` (needs a ``'dropout'`` rng).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dualsig_jax.models import spec as S
from dualsig_jax.models.layers import (
  ConvReLUStack,
  avg_pool_3x3_same,
  max_pool,
  torch_batchnorm,
  torch_conv,
)


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU; children ``conv`` and ``bn``."""

  features: int
  kernel_size: Any
  stride: int = 1
  padding: Any = 0
  frozen_bn: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = torch_conv(
      self.features,
      self.kernel_size,
      stride=self.stride,
      padding=self.padding,
      use_bias=False,
      dtype=self.dtype,
      name='conv',
    )(x)
    x = torch_batchnorm(self.frozen_bn, eps=1e-3, dtype=self.dtype, name='bn')(x)
    return nn.relu(x)


class InceptionBlock(nn.Module):
  """Base for the Inception blocks: ``conv(name, f, k, ...)`` makes a named BasicConv2d."""

  frozen_bn: bool = True
  dtype: Any = jnp.float32

  def conv(self, name, features, kernel_size, stride=1, padding=0):
    return BasicConv2d(
      features, kernel_size, stride, padding, self.frozen_bn, self.dtype, name=name
    )


class InceptionA(InceptionBlock):
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv('branch1x1', 64, 1)(x)
    b5 = self.conv('branch5x5_2', 64, 5, padding=2)(self.conv('branch5x5_1', 48, 1)(x))
    b3 = self.conv('branch3x3dbl_1', 64, 1)(x)
    b3 = self.conv('branch3x3dbl_2', 96, 3, padding=1)(b3)
    b3 = self.conv('branch3x3dbl_3', 96, 3, padding=1)(b3)
    bp = self.conv('branch_pool', self.pool_features, 1)(avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(InceptionBlock):
  """InceptionB with configurable stride/padding: wsolevaluation's CAM variant uses 1 / 1
  (its pool branch always pads by 1), torchvision's 2 / 0 with an unpadded pool."""

  stride: int = 1
  padding: int = 1
  pool_padding: int = 1

  @nn.compact
  def __call__(self, x):
    b3 = self.conv('branch3x3', 384, 3, self.stride, self.padding)(x)
    bd = self.conv('branch3x3dbl_1', 64, 1)(x)
    bd = self.conv('branch3x3dbl_2', 96, 3, padding=1)(bd)
    bd = self.conv('branch3x3dbl_3', 96, 3, self.stride, self.padding)(bd)
    bp = max_pool(x, 3, self.stride, self.pool_padding)
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(InceptionBlock):
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv('branch1x1', 192, 1)(x)
    b7 = self.conv('branch7x7_1', c7, 1)(x)
    b7 = self.conv('branch7x7_2', c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv('branch7x7_3', 192, (7, 1), padding=(3, 0))(b7)
    bd = self.conv('branch7x7dbl_1', c7, 1)(x)
    bd = self.conv('branch7x7dbl_2', c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv('branch7x7dbl_3', c7, (1, 7), padding=(0, 3))(bd)
    bd = self.conv('branch7x7dbl_4', c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv('branch7x7dbl_5', 192, (1, 7), padding=(0, 3))(bd)
    bp = self.conv('branch_pool', 192, 1)(avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionCamTrunk(nn.Module):
  """InceptionV3-CAM's trunk: ``__call__(x [B,H,W,3], train=False)`` -> ``[B,h,w,1024]``
  (SPG_A3_2b output). 224 input -> 14x14 features (28x28 with ``large_feature_map``). The
  dropout before the 1x1 heads is the spec's ``head_dropout``."""

  large_feature_map: bool = False
  dtype: Any = jnp.float32
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    fb = not train  # BatchNorm mode (frozen_backbone only stops gradients)
    d = self.dtype
    x = x.astype(d)
    x = BasicConv2d(32, 3, 2, 1, fb, d, name='Conv2d_1a_3x3')(x)
    x = BasicConv2d(32, 3, 1, 0, fb, d, name='Conv2d_2a_3x3')(x)
    x = BasicConv2d(64, 3, 1, 1, fb, d, name='Conv2d_2b_3x3')(x)
    x = max_pool(x, 3, 2, 1, ceil_mode=True)
    x = BasicConv2d(80, 1, 1, 0, fb, d, name='Conv2d_3b_1x1')(x)
    x = BasicConv2d(192, 3, 1, 0, fb, d, name='Conv2d_4a_3x3')(x)
    x = max_pool(x, 3, 2, 1, ceil_mode=True)
    x = InceptionA(fb, d, pool_features=32, name='Mixed_5b')(x)
    x = InceptionA(fb, d, pool_features=64, name='Mixed_5c')(x)
    x = InceptionA(fb, d, pool_features=64, name='Mixed_5d')(x)
    if not self.large_feature_map:
      x = max_pool(x, 3, 2, 0, ceil_mode=True)
    x = InceptionB(fb, d, stride=1, padding=1, name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(fb, d, channels_7x7=c7, name=name)(x)
    drop = lambda y: nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    x = ConvReLUStack(1024, dtype=d, name='SPG_A3_1b')(drop(x))
    return ConvReLUStack(1024, dtype=d, name='SPG_A3_2b')(drop(x))


# main.py's lr rule for InceptionV3: a torch name containing one of these is a feature one.
LR = dict(
  lr_patterns=('Mixed', 'Conv2d_1', 'Conv2d_2', 'Conv2d_3', 'Conv2d_4'), lr_on_match='feature'
)


def cam_spec() -> S.BackboneSpec:
  """InceptionV3-CAM: dropout on the map, 1x1-conv heads (``SPG_A4`` / ``SPG_A4_2``), GAP."""
  return S.BackboneSpec(
    trunk=lambda lfm, dtype, rate: InceptionCamTrunk(lfm, dtype, rate),
    head=S.conv1x1_head,
    head_kind='conv',
    head_init=S.conv1x1_init,
    head_dropout=True,
    head_dropout_name='Dropout_2',  # after the trunk's two, as before issue 16
    torch_heads=('SPG_A4', 'SPG_A4_2'),
    torch_layout=S.TorchLayout(
      torchvision_file='inception_v3_google-1a9a5a14.pth',
      drop=('Mixed_7', 'AuxLogits.', 'fc.', 'fc2.'),
      new=('SPG_A3_1b.', 'SPG_A3_2b.', 'SPG_A4.', 'SPG_A4_2.'),
    ),
    **LR,
  )
