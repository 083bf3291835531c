"""Dual-branch backbones (Flax linen, NHWC) of both reference families, and helpers around
their variables: the public surface is building, loading and CAM functions.

Two families, as in the reference (``main.py``: ``wsol_cam`` for ``--method cam``, ``wsol``
for every gradient method): ``'cam'`` (VGG16-CAM, ResNet-CAM, InceptionV3-CAM: GAP + linear
heads) and ``'standard'`` (torchvision-style VGG16 with MLP heads, ResNets, InceptionV3 with
Linear heads on ``Mixed_7c``). Every model is a :class:`DualBranch` around a backbone's feature
trunk, built from its spec in the table ``BACKBONES`` (``models.backbones``): the same wrapper
:func:`dual_branch` puts around a user's model.

Every model's ``apply(variables, x [B,H,W,3] float32, train=False)`` returns
``{'features': [B,h,w,Cf], 'softmax_logits': [B,K], 'sigmoid_logits': [B,K]}`` (float32);
``apply(variables, features, method='head')`` is the pure head (no stop-gradient, no dropout).
Heads are always the top-level params ``fc`` (softmax) and ``fc2`` (sigmoid), whatever their
shape (a Dense, a 1x1 conv, or a whole MLP).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualsig_jax import vocab
from dualsig_jax.models.backbones import BACKBONES, get_spec, lr_group
from dualsig_jax.models.dual_branch import DualBranch, cam_fns, dual_branch, from_single_head
from dualsig_jax.models.heads import clone_head, head_weights, init_key
from dualsig_jax.models.naming import ARCHS, FAMILIES, check_arch, check_family
from dualsig_jax.models.nnx_branch import nnx_dual_branch
from dualsig_jax.models.spec import BoundHead

__all__ = [
  'ARCHS',
  'BACKBONES',
  'FAMILIES',
  'DualBranch',
  'dual_branch',
  'from_single_head',
  'nnx_dual_branch',
  'build_model',
  'init_variables',
  'init_input_size',
  'init_key',
  'head_weights',
  'clone_head',
  'cam_fns',
  'lr_group',
  'check_arch',
  'check_family',
]

_DEFAULT_DROPOUT = 0.5  # the reference's p wherever a model has dropout


def build_model(
  arch: str,
  num_classes: int,
  *,
  family: str = 'cam',
  large_feature_map: bool = False,
  dtype: Any = jnp.float32,
  frozen_backbone: bool = True,
  dropout_rate: float | None = None,
) -> nn.Module:
  """Build a dual-branch model. ``dtype`` is the compute dtype (params stay float32).

  Args:
    arch: one of ``ARCHS`` (vgg16, resnet50, inception_v3, vgg_tiny, resnet_tiny, resnet18,
      resnet34); with ``family`` a key of ``BACKBONES``.
    num_classes: K, the size of both heads.
    family: ``'cam'`` (the reference's wsol_cam/ models) or ``'standard'`` (its wsol/ models).
    large_feature_map: the reference's flag (28x28 features at 224 for VGG and ResNet and
      InceptionV3-CAM; the standard InceptionV3 ignores it, as the reference does).
    dtype: compute dtype, a jnp dtype or one of vocab.DTYPES ('float32' | 'bfloat16').
    frozen_backbone: ``True`` wraps everything upstream of the heads and the softmax head's
      output in ``jax.lax.stop_gradient`` (only ``fc2`` learns: the dual stage); ``False`` is
      the vanilla stage. It does not touch BatchNorm or dropout, which follow ``apply``'s
      ``train`` only: ``train=True`` normalises with the batch statistics (the updated running
      statistics come back in the ``batch_stats`` collection; the dual stage discards them, as
      the reference's frozen BatchNorms do) and turns dropout on; ``train=False`` uses the
      running statistics and no dropout.
    dropout_rate: p of every dropout of the model; ``None`` = the reference's 0.5. Models
      without dropout (VGG16-CAM, the ResNets) ignore it.
  Returns:
    a :class:`DualBranch` (``arch`` / ``family`` recorded on it).
  Raises:
    ValueError: unknown arch, family or dtype, num_classes < 1, dropout_rate not in [0, 1).
  """
  check_arch(arch)
  check_family(family)
  if int(num_classes) < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  if isinstance(dtype, str):
    if dtype not in vocab.DTYPES:
      raise ValueError(f'unknown dtype {dtype!r}; valid: {", ".join(vocab.DTYPES)}')
    dtype = jnp.dtype(dtype)
  rate = _DEFAULT_DROPOUT if dropout_rate is None else float(dropout_rate)
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate}')
  spec = get_spec(arch, family)
  return DualBranch(
    backbone=spec.trunk(bool(large_feature_map), dtype, rate),
    head_factory=BoundHead(spec.head, int(num_classes), dtype, rate),
    head_kind=spec.head_kind,
    frozen_backbone=bool(frozen_backbone),
    inline_backbone=True,  # params at the top level: the tree of every checkpoint so far
    head_dropout=rate if spec.head_dropout else 0.0,
    head_dropout_name=spec.head_dropout_name,
    dtype=dtype,
    arch=arch,
    family=family,
    min_input_size=spec.min_input_size,
  )


def init_input_size(model: nn.Module) -> int:
  """Smallest round image side that every layer of ``model`` accepts (64, or 96 for the
  standard InceptionV3; a user's :func:`dual_branch` model: 64); parameter shapes do not depend
  on it."""
  return int(getattr(model, 'min_input_size', 64))


def init_variables(
  model: nn.Module, rng: jax.Array | int = 0, image_size: int | None = None
) -> dict:
  """Fresh ``{'params': ..., 'batch_stats': ...}`` (batch_stats ``{}`` for VGG).

  ``rng``: int seed or key (turned into an RBG key, see :func:`init_key`). Parameter
  shapes do not depend on ``image_size``; the default (:func:`init_input_size`) is the
  smallest round size the model accepts, which keeps the init cheap.
  """
  rng = init_key(rng)
  image_size = init_input_size(model) if image_size is None else int(image_size)
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(lambda r, x: model.init(r, x, train=False))(rng, x)
  variables = dict(variables)
  variables.setdefault('batch_stats', {})
  return {'params': variables['params'], 'batch_stats': variables['batch_stats']}
