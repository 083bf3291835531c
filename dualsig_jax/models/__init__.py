"""Dual-branch backbones (Flax linen, NHWC) of both reference families, and helpers around
their variables.

Two families, as in the reference (``main.py``: ``wsol_cam`` for ``--method cam``, ``wsol``
for every gradient method): ``'cam'`` (VGG16-CAM, ResNet50-CAM, InceptionV3-CAM: GAP + linear
heads) and ``'standard'`` (torchvision-style VGG16 with MLP heads, ResNet50, InceptionV3 with
Linear heads on ``Mixed_7c``); see ``models.standard``.

Every model's ``apply(variables, x [B,H,W,3] float32, train=False)`` returns
``{'features': [B,h,w,Cf], 'softmax_logits': [B,K], 'sigmoid_logits': [B,K]}`` (float32);
``apply(variables, features, method='head')`` is the pure head (no stop-gradient, no dropout).
Heads are always the top-level params ``fc`` (softmax) and ``fc2`` (sigmoid), whatever their
shape (a Dense, a 1x1 conv, or a whole MLP).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dualsig_jax import vocab
from dualsig_jax.models import dual_branch as _dual_branch_lib
from dualsig_jax.models.dual_branch import DualBranch, dual_branch, from_single_head
from dualsig_jax.models.inception import InceptionCam
from dualsig_jax.models.layers import head_inits
from dualsig_jax.models.naming import (
  ARCHS,
  FAMILIES,
  arch_kind,
  check_arch,
  check_family,
  head_layers,
  head_param,
  head_torch_name,
  lr_group,
  torch_key,
)
from dualsig_jax.models.naming import get_path as _get_path
from dualsig_jax.models.resnet import ResNetCam
from dualsig_jax.models.standard import InceptionStandard, VGGStandard
from dualsig_jax.models.vgg import VGG16_CFG, VGG_TINY_CFG, VGGCam, vgg_cfg

__all__ = [
  'DualBranch',
  'dual_branch',
  'from_single_head',
  'MODELS',
  'FAMILIES',
  'build_model',
  'init_variables',
  'init_input_size',
  'head_weights',
  'clone_head',
  'lr_group',
  'cam_fns',
  'init_key',
  'torch_key',
  'arch_kind',
  'check_arch',
  'check_family',
]

_DEFAULT_DROPOUT = 0.5  # the reference's p wherever a model has dropout


# Builders: (num_classes, large_feature_map, dtype, frozen_backbone, dropout_rate) -> module.
def _vgg16(k, lfm, dtype, frozen, _):
  return VGGCam(
    k, cfg=vgg_cfg(VGG16_CFG, lfm), conv6_features=1024, frozen_backbone=frozen, dtype=dtype
  )


def _vgg_tiny(k, lfm, dtype, frozen, _):
  return VGGCam(
    k, cfg=vgg_cfg(VGG_TINY_CFG, lfm), conv6_features=128, frozen_backbone=frozen, dtype=dtype
  )


def _resnet50(k, lfm, dtype, frozen, _):
  return ResNetCam(k, large_feature_map=lfm, frozen_backbone=frozen, dtype=dtype)


def _resnet_tiny(k, lfm, dtype, frozen, _):
  # One bottleneck per stage, 32..128 output channels: a few MFLOPs at 128 px.
  return ResNetCam(
    k,
    blocks=(1, 1, 1, 1),
    planes=(8, 16, 32, 32),
    stem_width=16,
    large_feature_map=lfm,
    frozen_backbone=frozen,
    dtype=dtype,
  )


def _inception_v3(k, lfm, dtype, frozen, rate):
  return InceptionCam(
    k, large_feature_map=lfm, frozen_backbone=frozen, dtype=dtype, dropout_rate=rate
  )


def _vgg16_standard(k, lfm, dtype, frozen, rate):
  return VGGStandard(
    k,
    cfg=vgg_cfg(VGG16_CFG, lfm),
    frozen_backbone=frozen,
    dtype=dtype,
    dropout_rate=rate,
    arch='vgg16',
  )


def _vgg_tiny_standard(k, lfm, dtype, frozen, rate):
  # 128-channel features, 3x3 adaptive pool (uneven, overlapping bins below 9 px), hidden 64.
  return VGGStandard(
    k,
    cfg=vgg_cfg(VGG_TINY_CFG, lfm),
    hidden=64,
    pool_size=3,
    frozen_backbone=frozen,
    dtype=dtype,
    dropout_rate=rate,
    arch='vgg_tiny',
  )


def _inception_v3_standard(k, lfm, dtype, frozen, rate):
  del lfm  # wsol/inception.py ignores large_feature_map
  return InceptionStandard(k, frozen_backbone=frozen, dtype=dtype, dropout_rate=rate)


#: arch -> family -> builder(num_classes, large_feature_map, dtype, frozen_backbone,
#: dropout_rate) -> nn.Module. The standard ResNets are the CAM ResNets (same layout).
MODELS: dict[str, dict[str, Callable[..., nn.Module]]] = {
  'vgg16': {'cam': _vgg16, 'standard': _vgg16_standard},
  'resnet50': {'cam': _resnet50, 'standard': _resnet50},
  'inception_v3': {'cam': _inception_v3, 'standard': _inception_v3_standard},
  'vgg_tiny': {'cam': _vgg_tiny, 'standard': _vgg_tiny_standard},
  'resnet_tiny': {'cam': _resnet_tiny, 'standard': _resnet_tiny},
}
assert tuple(MODELS) == ARCHS and all(tuple(v) == FAMILIES for v in MODELS.values())


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
    arch: one of ``MODELS`` (vgg16, resnet50, inception_v3, vgg_tiny, resnet_tiny).
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
  builder = MODELS[arch][family]
  return builder(int(num_classes), bool(large_feature_map), dtype, bool(frozen_backbone), rate)


def init_input_size(model: nn.Module) -> int:
  """Smallest round image side that every layer of ``model`` accepts (64, or 96 for the
  standard InceptionV3); parameter shapes do not depend on it."""
  return int(getattr(model, 'min_input_size', 64))


def init_key(rng: jax.Array | int) -> jax.Array:
  """An RBG-PRNG key derived from ``rng`` (int seed, typed key or raw uint32 key).

  Initialisers draw one tensor per layer; with threefry XLA:CPU spends seconds compiling
  each draw, with RBG a fraction of that. Same ``rng`` -> same key.
  """
  if isinstance(rng, (int, np.integer)):
    return jax.random.key(int(rng), impl='rbg')
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    if 'rbg' in str(jax.random.key_impl(rng)):
      return rng
    rng = jax.random.key_data(rng)
  data = np.asarray(rng).astype(np.uint64).ravel()
  seed = int(np.bitwise_xor.reduce(data * np.uint64(0x9E3779B1)) % np.uint64(2**62))
  return jax.random.key(seed, impl='rbg')


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


def head_weights(
  variables: dict,
  branch: str = 'sigmoid',
  *,
  arch: str | None = None,
  family: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """CAM weights of a linear head: ``(w [Cf, K] float32, b [K] float32)``.

  ``branch``: ``'softmax'`` (``fc``) or ``'sigmoid'`` (``fc2``); ``'fc'``/``'fc2'`` also work.
  ``arch`` / ``family`` only name the model in errors. A head that is an MLP (the standard
  VGG16's) has no such weights: ``ValueError`` naming the head and the methods that work.
  """
  name = head_param(branch)
  p = variables['params'][name]
  if 'kernel' not in p:
    layers = [_get_path(p, path) for path in head_layers(p)]
    sizes = [int(np.shape(layers[0]['kernel'])[0])] + [int(np.shape(x['bias'])[0]) for x in layers]
    torch_name = head_torch_name(arch, name, family or 'cam') if arch else name
    who = f' of {arch} ({family or "cam"})' if arch else f' ({name})'
    from dualsig_jax.cam.methods import linear_head_required  # late: cam is optional here

    raise linear_head_required(
      f'the {"softmax" if name == "fc" else "sigmoid"} head{who} is an MLP '
      f'({torch_name}: {"-".join(map(str, sizes))})'
    )
  kernel = jnp.asarray(p['kernel'], jnp.float32)
  return kernel.reshape(-1, kernel.shape[-1]), jnp.asarray(p['bias'], jnp.float32)


def clone_head(
  variables: dict,
  *,
  mode: str = 'clone',
  rng: jax.Array | int | None = None,
  arch: str | None = None,
  family: str = 'cam',
) -> dict:
  """New variables whose sigmoid head ``fc2`` starts from ``fc`` or from a fresh init.

  ``mode='clone'``: ``fc2`` is a copy of the whole ``fc`` subtree (the paper's text).
  ``mode='init'``: ``fc2`` gets the reference's fresh init of that head (what the published
  code runs, as its ``fc2`` is never loaded): every Linear N(0, 0.01) with zero bias (the CAM
  VGG16/ResNet50 heads, the standard ResNet50 head, each Linear of the standard VGG16's MLP);
  InceptionV3-CAM's 1x1-conv head xavier_uniform (gain 1) with zero bias; the standard
  InceptionV3's Linear trunc_normal(std 0.1, +-2) with torch's default bias
  U(-1/sqrt(2048), 1/sqrt(2048)). Needs ``rng`` (int or key) and ``arch`` (+ ``family``).
  Other leaves are shared, not copied. Returns ``{'params': ..., <other collections>}``.
  """
  params = dict(variables['params'])
  fc = params['fc']
  if mode == 'clone':
    params['fc2'] = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), fc)
  elif mode == 'init':
    if rng is None or arch is None:
      raise ValueError(
        "clone_head(mode='init') needs rng and arch (and family) to draw the reference's init"
      )
    kind = arch_kind(arch)
    check_family(family)
    key = init_key(rng)
    fresh: dict = {}
    for path in head_layers(fc):
      layer = _get_path(fc, path)
      kshape, bshape = np.shape(layer['kernel']), np.shape(layer['bias'])
      kernel_init, bias_init = head_inits(kind, family, int(np.prod(kshape[:-1])))
      key, kk, kb = jax.random.split(key, 3)
      new = {
        'kernel': kernel_init(kk, kshape, jnp.float32),
        'bias': bias_init(kb, bshape, jnp.float32),
      }
      if path:
        fresh[path[0]] = new
      else:
        fresh = new
    params['fc2'] = fresh
  else:
    raise ValueError(f'unknown mode {mode!r}; valid: clone, init')
  out = dict(variables)
  out['params'] = params
  return out


def cam_fns(model: nn.Module) -> dict[str, Callable]:
  """Adapters for ``dualsig_jax.cam.compute_cams`` (also for a :func:`dual_branch` model):
  ``apply_fn(variables, images [B,H,W,3]) -> outputs dict`` (inference mode),
  ``head_fn(variables, features [B,h,w,Cf]) -> {'softmax_logits', 'sigmoid_logits'}``,
  ``head_weights_fn(variables, branch) -> (w [Cf,K], b [K])`` (``ValueError`` for an MLP
  head, whose maps need a gradient method)."""

  if isinstance(model, DualBranch):
    return _dual_branch_lib.cam_fns(model)

  def apply_fn(variables, images):
    return model.apply(variables, images, train=False)

  def head_fn(variables, features):
    return model.apply(variables, features, method='head')

  arch, family = getattr(model, 'arch', None), getattr(model, 'family', None)

  def head_weights_fn(variables, branch):
    return head_weights(variables, branch, arch=arch, family=family)

  return {'apply_fn': apply_fn, 'head_fn': head_fn, 'head_weights_fn': head_weights_fn}
