"""VGG16 trunks of both families (wsolevaluation's VGG16-CAM, torchvision's VGG16) and the
CPU-sized ``vgg_tiny``, with their specs.

torch layout mirrored (key names): ``features.<i>`` (torch Sequential indices, ReLUs and
pools counted), ``conv6`` (CAM family); heads ``fc`` / ``fc2`` (standard family: torchvision's
classifier MLP, ``classifier`` / ``classifier_2`` in torch, layers ``0``, ``3``, ``6``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dualsig_jax.models import spec as S
from dualsig_jax.models.layers import adaptive_avg_pool, max_pool, torch_conv, torch_flatten

# 'M' = 2x2/2 max pool. The last pool of torchvision's VGG16 is dropped (14x14 at 224).
VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
VGG_TINY_CFG = (16, 'M', 32, 'M', 64, 'M', 128)


def vgg_cfg(base: Sequence, large_feature_map: bool) -> tuple:
  """``large_feature_map`` drops the last remaining pool (28x28 features at 224)."""
  cfg = list(base)
  if large_feature_map:
    last = max(i for i, v in enumerate(cfg) if v == 'M')
    del cfg[last]
  return tuple(cfg)


class VGGFeatures(nn.Module):
  """torch ``nn.Sequential`` of conv3x3+ReLU / pools; convs named by their torch index."""

  cfg: tuple
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    idx = 0
    for v in self.cfg:
      if v == 'M':
        x = max_pool(x, 2, 2)
        idx += 1
      else:
        x = torch_conv(int(v), 3, padding=1, dtype=self.dtype, name=str(idx))(x)
        x = nn.relu(x)
        idx += 2  # conv + ReLU occupy two Sequential slots
    return x


class VGGCamTrunk(nn.Module):
  """VGG-CAM's trunk: features -> conv6 3x3 + ReLU; ``[B, H, W, 3]`` -> ``[B, h, w, C6]``."""

  cfg: tuple = VGG16_CFG
  conv6_features: int = 1024
  dtype: Any = jnp.float32

  def setup(self):
    self.features = VGGFeatures(self.cfg, dtype=self.dtype)
    self.conv6 = torch_conv(self.conv6_features, 3, padding=1, dtype=self.dtype)

  def __call__(self, x):
    return nn.relu(self.conv6(self.features(x.astype(self.dtype))))


class VGGTrunk(nn.Module):
  """torchvision VGG's convs (the standard family): ``[B, H, W, 3]`` -> ``[B, h, w, C]``, the
  last conv's ReLU output (the reference's Grad-CAM target ``features[-1]``)."""

  cfg: tuple = VGG16_CFG
  dtype: Any = jnp.float32

  def setup(self):
    self.features = VGGFeatures(self.cfg, dtype=self.dtype)

  def __call__(self, x):
    return self.features(x.astype(self.dtype))


class VGGClassifier(nn.Module):
  """torchvision's VGG classifier on the map: AdaptiveAvgPool(pool_size), torch's C-major
  flatten, ``nn.Sequential(Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear)`` with the
  Dense layers named by their Sequential index ``'0'``, ``'3'``, ``'6'``.

  ``__call__(features [B, h, w, C], train=False)`` -> ``[B, num_classes]``. Fresh layers follow
  the reference: N(0, 0.01) weights, zero bias. Dropout is on only with ``train=True``.
  """

  num_classes: int
  hidden: int = 4096
  pool_size: int = 7
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, train: bool = False):
    x = torch_flatten(adaptive_avg_pool(features.astype(self.dtype), self.pool_size))
    kernel_init, bias_init = S.linear_init(x.shape[-1])

    def dense(n, name):
      return nn.Dense(
        n,
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


# main.py's lr rule for VGG: a torch name containing 'features.' is a feature parameter.
_LR = dict(lr_patterns=('features.',), lr_on_match='feature')


def cam_spec(base: tuple, conv6: int, torchvision: bool = True) -> S.BackboneSpec:
  """VGG-CAM (wsolevaluation): trunk + conv6, GAP + Linear heads."""
  return S.BackboneSpec(
    trunk=lambda lfm, dtype, rate: VGGCamTrunk(vgg_cfg(base, lfm), conv6, dtype),
    head=S.dense_head(S.linear_init),
    head_kind='linear',
    head_init=S.linear_init,
    torch_layout=S.TorchLayout(
      torchvision_file='vgg16-397923af.pth' if torchvision else '',
      drop=('classifier.',),
      new=('conv6.', 'fc.', 'fc2.'),
      renumber_features=True,
    ),
    **_LR,
  )


def standard_spec(
  base: tuple, hidden: int, pool_size: int, torchvision: bool = True
) -> S.BackboneSpec:
  """torchvision VGG (the reference's wsol/vgg.py): convs without the last pool, the classifier
  MLP on an adaptive pool of the map as both heads (``classifier`` / ``classifier_2``)."""
  return S.BackboneSpec(
    trunk=lambda lfm, dtype, rate: VGGTrunk(vgg_cfg(base, lfm), dtype),
    head=lambda k, dtype, rate: VGGClassifier(k, hidden, pool_size, rate, dtype),
    head_kind='map',
    head_init=S.linear_init,
    torch_heads=('classifier', 'classifier_2'),
    torch_layout=S.TorchLayout(
      torchvision_file='vgg16-397923af.pth' if torchvision else '',
      renumber_features=True,
      head_out='6',
    ),
    **_LR,
  )
