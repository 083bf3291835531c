"""Building blocks that reproduce PyTorch's numerics in Flax (NHWC).

PyTorch pads explicitly and rounds pooled sizes in a way Flax's "SAME"/"VALID" strings do
not always reproduce (e.g. ``ceil_mode=True`` max pooling in InceptionV3-CAM), so every
conv/pool here takes torch-style integer paddings. Parameters are always float32;
``dtype`` is only the compute dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# torchvision/wsolevaluation initialise convs with Kaiming-normal (fan_out, ReLU gain).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# Fresh heads as the reference initialises them (init_weights is on by default):
# wsol*/util.py initialize_weights sets every Linear to N(0, 0.01) with bias 0 (VGG16-CAM,
# ResNet50-CAM and both standard ones, each Linear of the standard VGG16's MLPs) and every
# conv of InceptionV3-CAM, its 1x1 heads included, to xavier_uniform (gain 1) with bias 0.
linear_head_init = nn.initializers.normal(0.01)
conv_head_init = nn.initializers.xavier_uniform()  # U(-a, a), a = sqrt(6 / (fan_in + fan_out))
# The standard InceptionV3 (wsol/inception.py) keeps torchvision's Inception3 loop:
# trunc_normal_(w, std=0.1, a=-2, b=2) -- bounds in absolute units, i.e. +-20 std -- and it
# leaves the Linear bias at torch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
inception_fc_init = nn.initializers.truncated_normal(0.1, lower=-20.0, upper=20.0)


def torch_linear_bias_init(fan_in: int):
  """torch.nn.Linear's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (Flax's bias
  initialisers do not see fan_in, so it is bound here)."""
  bound = 1.0 / float(np.sqrt(fan_in))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def torch_conv(
  features: int,
  kernel_size,
  *,
  stride=1,
  padding=0,
  use_bias=True,
  dtype: Dtype = jnp.float32,
  name: str | None = None,
  kernel_init=conv_kernel_init,
) -> nn.Conv:
  """A ``nn.Conv`` configured like ``torch.nn.Conv2d(k, stride, padding)``.

  Input/output ``[B, H, W, C]``; kernel stored HWIO float32.
  """
  kh, kw = _pair(kernel_size)
  ph, pw = _pair(padding)
  return nn.Conv(
    features,
    (kh, kw),
    strides=_pair(stride),
    padding=((ph, ph), (pw, pw)),
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=kernel_init,
    bias_init=nn.initializers.zeros,
    name=name,
  )


def torch_batchnorm(
  use_running_average: bool,
  *,
  eps: float = 1e-5,
  dtype: Dtype = jnp.float32,
  name: str | None = None,
) -> nn.BatchNorm:
  """``nn.BatchNorm`` matching ``torch.nn.BatchNorm2d`` (torch momentum 0.1 == flax 0.9).

  Note: Flax tracks the biased batch variance in ``var`` while torch tracks the unbiased
  one; this only affects running statistics gathered while training, not inference.
  """
  return nn.BatchNorm(
    use_running_average=use_running_average,
    momentum=0.9,
    epsilon=eps,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def _pool_pads(size: int, k: int, s: int, p: int, ceil_mode: bool) -> tuple[int, int]:
  """(left, right) padding so that a VALID window sweep gives torch's output size."""
  span = size + 2 * p - k
  if ceil_mode:
    out = -(-span // s) + 1
    # torch drops a last window that would start inside the right padding only.
    if (out - 1) * s >= size + p:
      out -= 1
  else:
    out = span // s + 1
  extra = (out - 1) * s + k - (size + 2 * p)
  if not ceil_mode:
    return p, p  # reduce_window's floor division already matches torch
  return p, p + max(extra, 0)


def max_pool(
  x: jax.Array, kernel_size: int, stride: int, padding: int = 0, ceil_mode: bool = False
) -> jax.Array:
  """``torch.nn.functional.max_pool2d`` on ``[B, H, W, C]`` (padding counts as -inf)."""
  pads = (
    _pool_pads(x.shape[1], kernel_size, stride, padding, ceil_mode),
    _pool_pads(x.shape[2], kernel_size, stride, padding, ceil_mode),
  )
  # nn.max_pool pads with the -inf init value, as torch does.
  return nn.max_pool(x, (kernel_size, kernel_size), (stride, stride), padding=pads)


def avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  """``F.avg_pool2d(x, 3, stride=1, padding=1)`` (count_include_pad=True: always /9)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)


def _adaptive_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``[n_out, n_in]`` averaging weights of torch's adaptive pooling bins
  ``[floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out))`` (bins may overlap)."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -(-((i + 1) * n_in) // n_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, output_size: int | Sequence[int]) -> jax.Array:
  """``torch.nn.AdaptiveAvgPool2d(output_size)`` on ``[B, H, W, C]`` -> ``[B, oh, ow, C]``.

  Any input size, also smaller than the output (bins then repeat input cells), as in torch.
  """
  oh, ow = _pair(output_size)
  b, h, w, c = x.shape
  if h % oh == 0 and w % ow == 0:  # equal, disjoint bins: a plain mean (VGG16 at 224)
    return jnp.mean(x.reshape(b, oh, h // oh, ow, w // ow, c), axis=(2, 4))
  mh = jnp.asarray(_adaptive_matrix(h, oh), x.dtype)
  mw = jnp.asarray(_adaptive_matrix(w, ow), x.dtype)
  hi = jax.lax.Precision.HIGHEST  # a pooled mean, not a learned matmul: keep f32 exact
  y = jnp.einsum('oh,bhwc->bowc', mh, x, precision=hi)
  return jnp.einsum('pw,bowc->bopc', mw, y, precision=hi)


def torch_flatten(x: jax.Array) -> jax.Array:
  """``torch.flatten(x, 1)`` of the NCHW twin of ``x [B, H, W, C]`` -> ``[B, C*H*W]``
  (C-major, so Linear weights converted from torch apply unchanged)."""
  return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """``[B, H, W, C]`` -> ``[B, C]`` mean over space (AdaptiveAvgPool2d(1) + flatten)."""
  return jnp.mean(x, axis=(1, 2))


class ConvReLUStack(nn.Module):
  """A torch ``nn.Sequential(Conv2d, ReLU)`` stand-in whose conv is named ``'0'``."""

  features: int
  kernel_size: int = 3
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = torch_conv(
      self.features, self.kernel_size, padding=self.padding, dtype=self.dtype, name='0'
    )(x)
    return nn.relu(x)
