"""VGG16-CAM (wsolevaluation) and its CPU-sized sibling ``vgg_tiny``.

torch layout mirrored (key names): ``features.<i>`` (torch Sequential indices, ReLUs and
pools counted), ``conv6``, ``fc`` (softmax head), ``fc2`` (sigmoid head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dualsig_jax.models.layers import DualHeadMixin, linear_head, max_pool, torch_conv

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


class VGGCam(DualHeadMixin, nn.Module):
  """VGG-CAM: features -> conv6 3x3 + ReLU -> GAP -> fc / fc2.

  ``__call__(x [B,H,W,3] float32, train=False)`` -> dict with ``features`` ``[B,h,w,C6]``,
  ``softmax_logits`` / ``sigmoid_logits`` ``[B,K]`` (all float32).
  """

  num_classes: int
  cfg: tuple = VGG16_CFG
  conv6_features: int = 1024
  frozen_backbone: bool = True
  dtype: Any = jnp.float32

  def setup(self):
    self.features = VGGFeatures(self.cfg, dtype=self.dtype)
    self.conv6 = torch_conv(self.conv6_features, 3, padding=1, dtype=self.dtype)
    self.fc = linear_head(self.num_classes, self.dtype)
    self.fc2 = linear_head(self.num_classes, self.dtype)

  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm or dropout in VGG-CAM
    x = self.features(x.astype(self.dtype))
    x = nn.relu(self.conv6(x))
    return self._outputs(x)
