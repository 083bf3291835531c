"""Dual-branch CAM backbones (Flax linen, NHWC) and helpers around their variables.

Every model's ``apply(variables, x [B,H,W,3] float32, train=False)`` returns
``{'features': [B,h,w,Cf], 'softmax_logits': [B,K], 'sigmoid_logits': [B,K]}`` (float32);
``apply(variables, features, method='head')`` is the pure head (no stop-gradient).
Heads are always the top-level params ``fc`` (softmax) and ``fc2`` (sigmoid).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dualsig_jax.models.inception import InceptionCam
from dualsig_jax.models.layers import head_kernel_init
from dualsig_jax.models.naming import (
  MODELS as _MODEL_NAMES,
)
from dualsig_jax.models.naming import (
  check_arch,
  family,
  lr_group,
  torch_key,
)
from dualsig_jax.models.resnet import ResNetCam
from dualsig_jax.models.vgg import VGG16_CFG, VGG_TINY_CFG, VGGCam, vgg_cfg

__all__ = [
  'MODELS',
  'build_model',
  'init_variables',
  'head_weights',
  'clone_head',
  'lr_group',
  'cam_fns',
  'init_key',
  'torch_key',
  'family',
  'check_arch',
]


def _vgg16(k, lfm, dtype, dual):
  return VGGCam(k, cfg=vgg_cfg(VGG16_CFG, lfm), conv6_features=1024, dual=dual, dtype=dtype)


def _vgg_tiny(k, lfm, dtype, dual):
  return VGGCam(k, cfg=vgg_cfg(VGG_TINY_CFG, lfm), conv6_features=128, dual=dual, dtype=dtype)


def _resnet50(k, lfm, dtype, dual):
  return ResNetCam(k, large_feature_map=lfm, dual=dual, dtype=dtype)


def _resnet_tiny(k, lfm, dtype, dual):
  # One bottleneck per stage, 32..128 output channels: a few MFLOPs at 128 px.
  return ResNetCam(
    k,
    blocks=(1, 1, 1, 1),
    planes=(8, 16, 32, 32),
    stem_width=16,
    large_feature_map=lfm,
    dual=dual,
    dtype=dtype,
  )


def _inception_v3(k, lfm, dtype, dual):
  return InceptionCam(k, large_feature_map=lfm, dual=dual, dtype=dtype)


#: name -> builder(num_classes, large_feature_map, dtype, dual) -> nn.Module
MODELS: dict[str, Callable[..., nn.Module]] = {
  'vgg16': _vgg16,
  'resnet50': _resnet50,
  'inception_v3': _inception_v3,
  'vgg_tiny': _vgg_tiny,
  'resnet_tiny': _resnet_tiny,
}
assert tuple(MODELS) == _MODEL_NAMES


def build_model(
  arch: str,
  num_classes: int,
  *,
  large_feature_map: bool = False,
  dtype: Any = jnp.float32,
  dual: bool = True,
) -> nn.Module:
  """Build a CAM model. ``dtype`` is the compute dtype (params stay float32).

  ``dual=True`` wraps the backbone output and the softmax head output in
  ``jax.lax.stop_gradient`` and keeps BatchNorm in inference mode (only ``fc2`` trains);
  ``dual=False`` is the vanilla stage. Unknown ``arch`` -> ``ValueError``.
  """
  check_arch(arch)
  if int(num_classes) < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  if isinstance(dtype, str):
    if dtype not in ('float32', 'bfloat16', 'float16'):
      raise ValueError(f'unknown dtype {dtype!r}; valid: float32, bfloat16, float16')
    dtype = jnp.dtype(dtype)
  return MODELS[arch](int(num_classes), bool(large_feature_map), dtype, bool(dual))


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


def init_variables(model: nn.Module, rng: jax.Array | int = 0, image_size: int = 64) -> dict:
  """Fresh ``{'params': ..., 'batch_stats': ...}`` (batch_stats ``{}`` for VGG).

  ``rng``: int seed or key (turned into an RBG key, see :func:`init_key`). Parameter
  shapes do not depend on ``image_size``; the default 64 is the smallest round size every
  arch accepts, which keeps the init cheap.
  """
  rng = init_key(rng)
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(lambda r, x: model.init(r, x, train=False))(rng, x)
  variables = dict(variables)
  variables.setdefault('batch_stats', {})
  return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def head_weights(variables: dict, branch: str = 'sigmoid') -> tuple[jax.Array, jax.Array]:
  """CAM weights of a head: ``(w [Cf, K] float32, b [K] float32)``.

  ``branch``: ``'softmax'`` (``fc``) or ``'sigmoid'`` (``fc2``); ``'fc'``/``'fc2'`` also work.
  """
  name = {'softmax': 'fc', 'sigmoid': 'fc2', 'fc': 'fc', 'fc2': 'fc2'}.get(branch)
  if name is None:
    raise ValueError(f'unknown branch {branch!r}; valid: softmax, sigmoid')
  p = variables['params'][name]
  kernel = jnp.asarray(p['kernel'], jnp.float32)
  return kernel.reshape(-1, kernel.shape[-1]), jnp.asarray(p['bias'], jnp.float32)


def clone_head(variables: dict, *, mode: str = 'clone', rng: jax.Array | int | None = None) -> dict:
  """Return new variables whose ``fc2`` is a copy of ``fc`` (``mode='clone'``, the
  paper's step 2) or freshly initialised (``mode='init'``, needs ``rng``; same init as
  the model's heads). Other leaves are shared, not copied."""
  params = dict(variables['params'])
  fc = params['fc']
  if mode == 'clone':
    params['fc2'] = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), fc)
  elif mode == 'init':
    if rng is None:
      raise ValueError("clone_head(mode='init') needs rng")
    kernel = head_kernel_init(init_key(rng), fc['kernel'].shape, jnp.float32)
    params['fc2'] = {'kernel': kernel, 'bias': jnp.zeros(fc['bias'].shape, jnp.float32)}
  else:
    raise ValueError(f'unknown mode {mode!r}; valid: clone, init')
  out = dict(variables)
  out['params'] = params
  return out


def cam_fns(model: nn.Module) -> dict[str, Callable]:
  """Adapters for ``dualsig_jax.cam.compute_cams``:
  ``apply_fn(variables, images [B,H,W,3]) -> outputs dict`` (inference mode),
  ``head_fn(variables, features [B,h,w,Cf]) -> {'softmax_logits', 'sigmoid_logits'}``,
  ``head_weights_fn(variables, branch) -> (w [Cf,K], b [K])``."""

  def apply_fn(variables, images):
    return model.apply(variables, images, train=False)

  def head_fn(variables, features):
    return model.apply(variables, features, method='head')

  return {'apply_fn': apply_fn, 'head_fn': head_fn, 'head_weights_fn': head_weights}
