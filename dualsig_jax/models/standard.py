"""The reference's standard InceptionV3 (its ``wsol/inception.py``): torchvision's Inception3
(``transform_input=False``, no aux logits) through ``Mixed_7c`` (2048 channels; 5x5 at 224,
8x8 at 299), then ``AdaptiveAvgPool2d(1)``, dropout and Linear heads ``fc`` / ``fc2``. As in the
reference, ``large_feature_map`` changes nothing here. The standard VGG16 is in ``vgg.py``; the
standard ResNets are the CAM ones (``resnet.py``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dualsig_jax.models import spec as S
from dualsig_jax.models.inception import (
  LR,
  BasicConv2d,
  InceptionA,
  InceptionB,
  InceptionBlock,
  InceptionC,
)
from dualsig_jax.models.layers import avg_pool_3x3_same, max_pool


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


class InceptionTrunk(nn.Module):
  """torchvision Inception3 through ``Mixed_7c``: ``__call__(x [B,H,W,3], train=False)`` ->
  ``[B,h,w,2048]`` (the reference's Grad-CAM target; 5x5 at 224). No input transformation (the
  reference builds it with ``transform_input=False``, also for torchvision's Google weights).
  BatchNorm uses batch statistics only when ``train=True``. Inputs need >= 75 px."""

  dtype: Any = jnp.float32

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
    return InceptionE(fb, d, name='Mixed_7c')(x)


def spec() -> S.BackboneSpec:
  """The standard InceptionV3: GAP, one dropout, torchvision's Linear as both heads."""
  return S.BackboneSpec(
    trunk=lambda lfm, dtype, rate: InceptionTrunk(dtype),  # lfm ignored, as the reference does
    head=S.dense_head(S.torchvision_inception_fc_init, 2048),
    head_kind='linear',
    head_init=S.torchvision_inception_fc_init,
    head_dropout=True,
    head_dropout_name='Dropout_0',  # the name it had before issue 16: the same masks
    torch_layout=S.TorchLayout(
      torchvision_file='inception_v3_google-1a9a5a14.pth',
      drop=('AuxLogits.',),
      notes=(
        'torchvision trained these weights with transform_input=True; the reference (and this '
        'model) use transform_input=False with ImageNet mean/std inputs',
      ),
    ),
    min_input_size=96,  # 75 is torchvision's minimum
    **LR,
  )
