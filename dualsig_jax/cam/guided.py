"""Guided Backpropagation and Guided Grad-CAM for Linen and NNX models, unmodified.

Guided Backprop (Springenberg et al. 2015) is the input gradient of the target logit with every
ReLU's backward pass replaced by ``g * [x > 0] * [g > 0]`` (pytorch-grad-cam's
``GuidedBackpropReLU``). pytorch-grad-cam swaps ``torch.nn.ReLU`` modules; Flax models call
ReLU as a function, so while the model is traced the names ``flax.linen.relu``,
``flax.nnx.relu`` and ``jax.nn.relu`` point to the guided ReLU. That reaches every ReLU
called through those names at call time (``nn.relu(x)``, ``nnx.relu(x)``, ``jax.nn.relu(x)``:
all of this project's backbones; in a compact method, also an ``nn.Sequential([..., nn.relu])``
built during the call). It cannot reach a ReLU bound before the call: ``from flax.linen import
relu`` at import time, a dataclass field default ``act = nn.relu``, a Sequential built in
``setup`` or an ``nnx.Sequential`` holding the function, ``jnp.maximum(x, 0)``,
``nn.activation.relu``. Tracing is single-threaded here: the names are swapped back on exit. If
no ReLU was reached the call is a ``ValueError`` rather than a silent plain gradient.

Guided Grad-CAM is ``guided_backprop * map[..., None]`` (the package's example: the map
broadcast over the colour channels times the guided gradients, before display scaling).
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from dualsig_jax.cam.explain import explain
from dualsig_jax.cam.target_layer import model_forward

_PATCHED = ((nn, 'relu'), (nnx, 'relu'), (jax.nn, 'relu'))


@jax.custom_vjp
def guided_relu(x: jax.Array) -> jax.Array:
  """``max(x, 0)`` whose backward passes only positive gradients at positive inputs."""
  return jnp.maximum(x, 0)


def _guided_fwd(x):
  return jnp.maximum(x, 0), x


def _guided_bwd(x, g):
  return (g * ((x > 0) & (g > 0)).astype(g.dtype),)


guided_relu.defvjp(_guided_fwd, _guided_bwd)


@contextlib.contextmanager
def _relu_swapped(counter: list):
  def counted(x):
    counter.append(1)
    return guided_relu(x)

  saved = [(mod, name, getattr(mod, name)) for mod, name in _PATCHED]
  try:
    for mod, name, _ in saved:
      setattr(mod, name, counted)
    yield
  finally:
    for mod, name, fn in saved:
      setattr(mod, name, fn)


@functools.partial(jax.jit, static_argnames=('forward',))
def _guided(state, images, targets, *, forward):
  logits = forward(state, images)
  if targets is None:
    targets = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  t = jax.lax.stop_gradient(targets)
  counter: list = []

  def score(x):
    with _relu_swapped(counter):
      lg = forward(state, x)
    return jnp.sum(jnp.take_along_axis(lg.astype(jnp.float32), t[:, None], axis=1))

  grads = jax.grad(score)(images)
  if not counter:
    raise ValueError(
      'guided backprop reached no ReLU: the model does not call nn.relu / nnx.relu / '
      'jax.nn.relu by name at call time (see dualsig_jax.cam.guided)'
    )
  return grads.astype(jnp.float32), targets


def guided_backprop(model, variables, images, targets=None, *, logits_fn=None, **call_kwargs):
  """Guided Backpropagation of the target logit w.r.t. the images, jitted and batched.

  Args:
    model, variables, logits_fn, call_kwargs: as ``explain`` (Linen with variables, or NNX
      with ``variables=None``).
    images: float ``[B, H, W, C]``.
    targets: int ``[B]`` or ``None`` for the argmax.
  Returns:
    ``(grads float32 [B, H, W, C], targets int32 [B])``.
  """
  if getattr(images, 'ndim', None) != 4:
    raise ValueError(f'images must be [B, H, W, C], got shape {getattr(images, "shape", None)}')
  if targets is not None:
    targets = jnp.asarray(targets, jnp.int32)
  forward, state = model_forward(model, variables, logits_fn=logits_fn, call_kwargs=call_kwargs)
  return _guided(state, images, targets, forward=forward)


def guided_gradcam(
  model,
  variables,
  images,
  target_layer,
  targets=None,
  *,
  method: str = 'gradcam',
  logits_fn=None,
  reshape_transform=None,
  **call_kwargs,
):
  """Guided Grad-CAM: ``guided_backprop * map[..., None]`` with the map of ``method``.

  Returns:
    ``(float32 [B, H, W, C], targets int32 [B])``.
  """
  maps, targets = explain(
    model,
    variables,
    images,
    target_layer,
    (method,),
    targets,
    logits_fn=logits_fn,
    reshape_transform=reshape_transform,
    **call_kwargs,
  )
  gb, _ = guided_backprop(model, variables, images, targets, logits_fn=logits_fn, **call_kwargs)
  return gb * maps[method][..., None], targets
