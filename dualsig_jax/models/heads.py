"""The two heads of every dual-branch model, written once: CAM weights (``head_weights``) and the
sigmoid head's start (``clone_head``: a copy of ``fc`` or the reference's fresh init, from the
backbone's spec for the built-in models). The CAM library's adapters of a model (``cam_fns``)
live with the model, in ``dual_branch.py``, which imports this module (never the reverse).

Heads are always the top-level params ``fc`` (softmax) and ``fc2`` (sigmoid), whatever their
shape (a Dense, a 1x1 conv, an MLP).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dualsig_jax.models.layers import conv_head_init, linear_head_init
from dualsig_jax.models.naming import get_path, head_layers, head_param

FC2_INITS = ('init', 'clone')  # as config.dual.head_init


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


def _plain(tree):
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def _flat(tree):
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def _spec_init(head_params: Mapping, head_init: Callable, rng) -> dict:
  """Every Dense/Conv layer of ``head_params`` (input to output) drawn with the spec's init."""
  key = init_key(rng)
  fresh: dict = {}
  for path in head_layers(head_params):
    layer = get_path(head_params, path)
    kshape, bshape = np.shape(layer['kernel']), np.shape(layer['bias'])
    kernel_init, bias_init = head_init(int(np.prod(kshape[:-1])))
    key, kk, kb = jax.random.split(key, 3)
    new = {
      'kernel': kernel_init(kk, kshape, jnp.float32),
      'bias': bias_init(kb, bshape, jnp.float32),
    }
    if path:
      fresh[path[0]] = new
    else:
      fresh = new
  return fresh


def fresh_head_params(head_params, rng: jax.Array | int = 0, head_init: Callable | None = None):
  """A fresh head with the structure of ``head_params`` (float32).

  ``head_init`` (a backbone spec's, ``fan_in -> (kernel_init, bias_init)``): each layer drawn
  as the reference draws it. ``None`` (a user's head): every 2-D ``kernel`` (a Dense) ~
  normal(0, 0.01), every conv ``kernel`` (>= 3-D, HWIO) xavier-uniform, every ``bias`` 0, any
  ``scale`` 1 and other leaves 0.
  """
  if head_init is not None:
    return _spec_init(head_params, head_init, rng)
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  leaves, treedef = jax.tree_util.tree_flatten_with_path(_plain(head_params))
  keys = jax.random.split(key, max(len(leaves), 1))
  out = []
  for k, (path, leaf) in zip(keys, leaves):
    name = str(getattr(path[-1], 'key', path[-1]))
    shape = jnp.shape(leaf)
    if name == 'kernel' and len(shape) == 2:
      out.append(linear_head_init(k, shape, jnp.float32))
    elif name == 'kernel' and len(shape) >= 3:
      out.append(conv_head_init(k, shape, jnp.float32))
    elif name == 'scale':
      out.append(jnp.ones(shape, jnp.float32))
    else:
      out.append(jnp.zeros(shape, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, out)


def init_sigmoid_head(
  variables, *, mode: str = 'init', rng: jax.Array | int = 0, head_init: Callable | None = None
) -> dict:
  """New variables whose ``fc2`` params are :func:`fresh_head_params` of ``fc`` (``'init'``,
  what the reference's published command trains from) or a copy of ``fc`` (``'clone'``, the
  paper's text). ``fc``'s entries in other collections (e.g. batch_stats) are copied to ``fc2``.
  Other leaves are shared, not copied."""
  if mode not in FC2_INITS:
    raise ValueError(f'unknown fc2 init {mode!r}; valid: clone, init')
  out = {col: dict(tree) for col, tree in variables.items()}
  for col, tree in out.items():
    if 'fc' not in tree:
      continue
    if col == 'params' and mode == 'init':
      tree['fc2'] = fresh_head_params(tree['fc'], rng, head_init)
    else:
      tree['fc2'] = jax.tree.map(lambda a: jnp.array(a, copy=True), tree['fc'])
  return out


def clone_head(
  variables: dict,
  *,
  mode: str = 'clone',
  rng: jax.Array | int | None = None,
  arch: str | None = None,
  family: str = 'cam',
) -> dict:
  """New variables of a built-in model whose sigmoid head ``fc2`` starts from ``fc``
  (``mode='clone'``, the paper's text) or from the reference's fresh init of that head
  (``mode='init'``, what the published code runs, as its ``fc2`` is never loaded: the spec's
  ``head_init`` of ``(arch, family)``, e.g. N(0, 0.01) Linears with zero bias; InceptionV3-CAM's
  1x1 conv xavier_uniform; the standard InceptionV3's trunc_normal(0.1) with torch's default
  bias). ``mode='init'`` needs ``rng`` (int or key) and ``arch``. Other leaves are shared.
  """
  if mode == 'init':
    if rng is None or arch is None:
      raise ValueError(
        "clone_head(mode='init') needs rng and arch (and family) to draw the reference's init"
      )
    from dualsig_jax.models.backbones import get_spec  # late: the table imports every model

    head_init = get_spec(arch, family).head_init
    return init_sigmoid_head(variables, mode='init', rng=rng, head_init=head_init)
  if mode != 'clone':
    raise ValueError(f'unknown mode {mode!r}; valid: clone, init')
  return init_sigmoid_head(variables, mode='clone')


def _mlp_error(p: Mapping, name: str, arch: str | None, family: str | None) -> ValueError:
  from dualsig_jax.cam.methods import linear_head_required  # late: cam is optional here

  layers = [get_path(p, path) for path in head_layers(p)]
  sizes = [int(np.shape(layers[0]['kernel'])[0])] + [int(np.shape(x['bias'])[0]) for x in layers]
  torch_name, who = name, f' ({name})'
  if arch:
    from dualsig_jax.models.backbones import get_spec, head_module_name

    torch_name = head_module_name(get_spec(arch, family or 'cam'), name)
    who = f' of {arch} ({family or "cam"})'
  return linear_head_required(
    f'the {"softmax" if name == "fc" else "sigmoid"} head{who} is an MLP '
    f'({torch_name}: {"-".join(map(str, sizes))})'
  )


def head_weights(
  variables: dict,
  branch: str = 'sigmoid',
  head_kind: str | None = None,
  *,
  arch: str | None = None,
  family: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """CAM weights of a linear or 1x1-conv head: ``(w [C, K] float32, b [K] float32)``.

  ``branch``: ``'softmax'`` (``fc``) or ``'sigmoid'`` (``fc2``); ``'fc'``/``'fc2'`` also work.
  ``head_kind``: the model's (``None``: read from the params). ``arch`` / ``family`` name a
  built-in model in errors. A head that is not one layer (an MLP) has no such weights:
  ``ValueError`` naming the head and the methods that work.
  """
  name = head_param(branch)
  p = variables['params'][name]
  layered = 'kernel' not in p and all(str(k).isdigit() for k in p)
  if layered and (head_kind is None or arch is not None):
    raise _mlp_error(p, name, arch, family)
  if head_kind not in (None, 'linear', 'conv'):
    raise ValueError(
      f"plain CAM needs a linear head (head_kind 'linear' or 'conv'), this model's head_kind is "
      f'{head_kind!r}; use a gradient method instead: gradcam, gradcam++, xgradcam, layercam'
    )
  leaves = _flat(_plain(p))
  by_name: dict[str, list] = {}
  for path, leaf in leaves:
    by_name.setdefault(str(getattr(path[-1], 'key', path[-1])), []).append(leaf)
  kernels, biases = by_name.get('kernel', []), by_name.get('bias', [])
  if len(kernels) != 1 or len(biases) > 1 or len(leaves) != len(kernels) + len(biases):
    names = [jax.tree_util.keystr(q) for q, _ in leaves]
    raise ValueError(f'a {head_kind} head must hold one kernel (+ bias), {name} holds {names}')
  kernel = jnp.asarray(kernels[0], jnp.float32)
  if kernel.ndim == 4 and kernel.shape[:2] != (1, 1):
    raise ValueError(f'a conv head for CAM must be 1x1, got kernel shape {kernel.shape}')
  w = kernel.reshape(-1, kernel.shape[-1])
  b = jnp.asarray(biases[0], jnp.float32) if biases else jnp.zeros(w.shape[-1], jnp.float32)
  return w, b
