"""What a built-in backbone declares about itself: ``BackboneSpec``.

Every built-in model is a :class:`~dualsig_jax.models.dual_branch.DualBranch` (the same wrapper a
user's model goes through) around a feature trunk; the spec says everything else that differs
between backbones, as data: the head (kind, factory, the reference's fresh init of each head
layer), the PyTorch names of the two heads, the reference's lr-group rule and the file layouts
the converter reads. The table of specs is ``models.backbones.BACKBONES``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dualsig_jax.models.layers import (
  conv_head_init,
  inception_fc_init,
  linear_head_init,
  torch_linear_bias_init,
)

# The reference's fresh init of one head layer: fan_in -> (kernel_init, bias_init).
HeadInit = Callable[[int], tuple]


def linear_init(fan_in: int) -> tuple:
  """wsol*/util.py initialize_weights on a Linear: N(0, 0.01) kernel, zero bias."""
  del fan_in
  return linear_head_init, nn.initializers.zeros


def conv1x1_init(fan_in: int) -> tuple:
  """InceptionV3-CAM's 1x1-conv heads: xavier_uniform (gain 1), zero bias."""
  del fan_in
  return conv_head_init, nn.initializers.zeros


def torchvision_inception_fc_init(fan_in: int) -> tuple:
  """torchvision Inception3's Linear: trunc_normal(std 0.1, +-2) kernel, torch's default bias
  U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return inception_fc_init, torch_linear_bias_init(fan_in)


@dataclasses.dataclass(frozen=True)
class TorchLayout:
  """The PyTorch files the converter reads for this backbone (data only; the code is in
  ``dualsig_jax.convert.layouts``).

  torchvision_file: torchvision's ImageNet file of this backbone ('' = there is none).
  drop: key prefixes of torchvision's file that the model does not have (dropped, as the
    reference does; in the standard family also dropped from the reference's files).
  new: key prefixes of the CAM model that torchvision's file lacks (freshly initialised).
  renumber_features: VGG: match the file's ``features.<i>`` convs to the model's by order
    (a model with fewer pools has other indices).
  head_out: the output layer inside a head module ('6' for torchvision's classifier MLP).
  notes: what a user should know when reading torchvision's file.
  """

  torchvision_file: str = ''
  drop: tuple[str, ...] = ()
  new: tuple[str, ...] = ()
  renumber_features: bool = False
  head_out: str = ''
  notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """One ``(arch, family)`` of ``BACKBONES``.

  trunk: ``(large_feature_map, dtype, dropout_rate) -> nn.Module`` mapping images
    ``[B, H, W, 3]`` (and ``train``) to the CAM layer's features ``[B, h, w, C]``.
  head: ``(num_classes, dtype, dropout_rate) -> nn.Module``, one head; ``fc`` and ``fc2`` are two.
  head_kind: ``'linear'`` (GAP -> head), ``'conv'`` (head on the map -> GAP) or ``'map'`` (the
    head pools the map itself, e.g. the standard VGG16's adaptive pool + MLP).
  head_init: the reference's fresh init of each Dense/Conv layer of a head (``clone_head``,
    the converter).
  head_dropout: a dropout (p = the model's dropout_rate) on the heads' shared input, named
    ``head_dropout_name`` (the name earlier versions gave it: same masks for the same rng).
  torch_heads: PyTorch module names of ``fc`` and ``fc2``.
  lr_patterns, lr_on_match: main.py's ``_FEATURE_PARAM_LAYER_PATTERNS`` rule: a parameter whose
    PyTorch name contains one of the patterns is in group ``lr_on_match``, else in the other.
  torch_layout: the PyTorch file layouts the converter reads (:class:`TorchLayout`).
  min_input_size: smallest round image side every layer accepts (init, shape probes).
  """

  trunk: Callable[..., nn.Module]
  head: Callable[..., nn.Module]
  head_kind: str
  head_init: HeadInit
  lr_patterns: tuple[str, ...]
  lr_on_match: str
  head_dropout: bool = False
  head_dropout_name: str | None = None
  torch_heads: tuple[str, str] = ('fc', 'fc2')
  torch_layout: TorchLayout = TorchLayout()
  min_input_size: int = 64


@dataclasses.dataclass(frozen=True)
class BoundHead:
  """``spec.head`` bound to its arguments: a zero-argument head factory that compares by value,
  so two ``build_model`` calls with the same arguments give equal (and equally hashed) models
  and ``jax.jit`` with the model as a static argument reuses its compilation."""

  make: Callable[..., nn.Module]
  num_classes: int
  dtype: Any
  dropout_rate: float

  def __call__(self) -> nn.Module:
    return self.make(self.num_classes, self.dtype, self.dropout_rate)


def dense_head(init: HeadInit, fan_in: int | None = None) -> Callable[..., nn.Module]:
  """Head factory of one ``nn.Dense`` with the reference's fresh init (``fan_in`` only matters
  for an init whose bias depends on it)."""

  def make(num_classes: int, dtype, dropout_rate: float) -> nn.Module:
    del dropout_rate
    kernel_init, bias_init = init(fan_in or 0)
    return nn.Dense(
      num_classes,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=kernel_init,
      bias_init=bias_init,
    )

  return make


def conv1x1_head(num_classes: int, dtype, dropout_rate: float) -> nn.Module:
  """A 1x1 ``nn.Conv`` head (InceptionV3-CAM's ``SPG_A4``), xavier-uniform, zero bias."""
  del dropout_rate
  kernel_init, bias_init = conv1x1_init(0)
  return nn.Conv(
    num_classes,
    (1, 1),
    padding='VALID',
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=kernel_init,
    bias_init=bias_init,
  )
