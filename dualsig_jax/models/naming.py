"""Flax variable path <-> PyTorch state-dict key, the name tables and the reference's lr groups.

Flax module names mirror the torch module tree (``layer1/0/conv1``), so a key is the
module path joined by dots plus the torch tensor name. The only renames: Flax's leaf names
(``kernel``/``scale``/``mean``/``var``) and the top-level heads, which are always ``fc``
(softmax) and ``fc2`` (sigmoid) in Flax: InceptionV3-CAM calls them ``SPG_A4``/``SPG_A4_2``
and the standard VGG16 ``classifier``/``classifier_2`` (MLPs, layers ``.0``/``.3``/``.6``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dualsig_jax import vocab

ARCHS = vocab.ARCHS
# 'cam': the reference's wsol_cam/ models (method cam); 'standard': its wsol/ models, which
# every gradient method (Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM) uses.
FAMILIES = vocab.FAMILIES

_LEAF_TO_TORCH = {
  ('params', 'kernel'): 'weight',
  ('params', 'scale'): 'weight',
  ('params', 'bias'): 'bias',
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}

# Torch names of the heads where they are not fc / fc2, per (arch kind, family).
HEAD_NAMES = {
  ('inception', 'cam'): {'fc': 'SPG_A4', 'fc2': 'SPG_A4_2'},
  ('vgg', 'standard'): {'fc': 'classifier', 'fc2': 'classifier_2'},
}

# main.py's _FEATURE_PARAM_LAYER_PATTERNS (one table for both families): a *substring* match on
# the torch name. For VGG/Inception a match means 'feature' (lr x 1); for ResNet 'classifier'.
_LR_PATTERNS = {
  'vgg': (('features.',), 'feature'),
  'resnet': (('layer4.', 'fc.'), 'classifier'),
  'inception': (('Mixed', 'Conv2d_1', 'Conv2d_2', 'Conv2d_3', 'Conv2d_4'), 'feature'),
}


# Branch -> the top-level param name of its head (the param names are accepted as well).
_HEAD_PARAMS = {'softmax': 'fc', 'sigmoid': 'fc2', 'fc': 'fc', 'fc2': 'fc2'}


def head_param(branch: str) -> str:
  """'fc' | 'fc2' for ``branch`` ('softmax' | 'sigmoid', or 'fc' | 'fc2'); else ValueError."""
  name = _HEAD_PARAMS.get(branch)
  if name is None:
    raise ValueError(f'unknown branch {branch!r}; valid: softmax, sigmoid')
  return name


def check_arch(arch: str) -> str:
  """Return ``arch`` or raise ``ValueError`` listing the valid names."""
  if arch not in ARCHS:
    raise ValueError(f'unknown arch {arch!r}; valid: {", ".join(ARCHS)}')
  return arch


def check_family(family: str) -> str:
  """Return ``family`` or raise ``ValueError`` listing the valid names."""
  if family not in FAMILIES:
    raise ValueError(f'unknown model family {family!r}; valid: {", ".join(FAMILIES)}')
  return family


def arch_kind(arch: str) -> str:
  """'vgg' | 'resnet' | 'inception' for an arch name."""
  check_arch(arch)
  return 'inception' if arch == 'inception_v3' else arch.split('_')[0].rstrip('0123456789')


def head_torch_name(arch: str, head: str, family: str = 'cam') -> str:
  """Torch module name of the Flax head ``'fc'`` or ``'fc2'``."""
  return HEAD_NAMES.get((arch_kind(arch), check_family(family)), {}).get(head, head)


def torch_key(arch: str, collection: str, path: tuple[str, ...], family: str = 'cam') -> str:
  """Torch state-dict key of the Flax leaf ``variables[collection][path...]``.

  >>> torch_key('resnet50', 'params', ('layer1', '0', 'bn1', 'scale'))
  'layer1.0.bn1.weight'
  >>> torch_key('vgg16', 'params', ('fc2', '3', 'kernel'), 'standard')
  'classifier_2.3.weight'
  """
  leaf = _LEAF_TO_TORCH.get((collection, path[-1]))
  if leaf is None:
    raise ValueError(f'no torch name for {collection}/{"/".join(path)}')
  modules = list(path[:-1])
  if modules and modules[0] in ('fc', 'fc2'):
    modules[0] = head_torch_name(arch, modules[0], family)
  return '.'.join(modules + [leaf])


def to_torch_layout(x: np.ndarray, collection: str, path: tuple[str, ...]) -> np.ndarray:
  """Flax array -> torch layout (HWIO -> OIHW conv kernels, [in,out] -> [out,in] dense)."""
  if collection == 'params' and path[-1] == 'kernel':
    if x.ndim == 4:
      return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))
    if x.ndim == 2:
      return np.ascontiguousarray(x.T)
  return x


def from_torch_layout(x: np.ndarray, collection: str, path: tuple[str, ...]) -> np.ndarray:
  """Inverse of :func:`to_torch_layout`."""
  if collection == 'params' and path[-1] == 'kernel':
    if x.ndim == 4:
      return np.ascontiguousarray(np.transpose(x, (2, 3, 1, 0)))
    if x.ndim == 2:
      return np.ascontiguousarray(x.T)
  return x


def torch_shape(shape: tuple[int, ...], collection: str, path: tuple[str, ...]) -> tuple:
  """Torch shape of a Flax leaf of ``shape``."""
  if collection == 'params' and path[-1] == 'kernel':
    if len(shape) == 4:
      return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
      return (shape[1], shape[0])
  return tuple(shape)


def lr_group(arch: str, path: tuple[str, ...], family: str = 'cam') -> str:
  """'feature' | 'classifier' for a Flax param path, by the reference's name rules.

  ``path`` may start with the collection (``'params'``); e.g.
  ``lr_group('resnet50', ('params', 'layer4', '0', 'conv1', 'kernel')) == 'classifier'``
  and ``lr_group('resnet50', ('fc2', 'kernel')) == 'feature'`` (reference quirk:
  ``'fc.'`` does not match ``fc2.*``). The patterns are matched on the torch name of the
  ``family``'s model (standard VGG16: ``classifier.*`` / ``classifier_2.*`` -> classifier).
  """
  path = tuple(str(p) for p in path)
  collection = 'params'
  if path and path[0] in ('params', 'batch_stats'):
    collection, path = path[0], path[1:]
  name = torch_key(arch, collection, path, family)
  patterns, group_on_match = _LR_PATTERNS[arch_kind(arch)]
  matched = any(p in name for p in patterns)
  other = 'classifier' if group_on_match == 'feature' else 'feature'
  return group_on_match if matched else other


def head_layers(head: Mapping) -> list[tuple[str, ...]]:
  """Paths of the Dense/Conv layers of a head subtree, input to output: ``[()]`` for a
  single layer, ``[('0',), ('3',), ('6',)]`` for the standard VGG16's MLP."""
  if 'kernel' in head:
    return [()]
  return [(k,) for k in sorted(head, key=int)]


def head_num_classes(head: Mapping) -> int:
  """Number of classes of a head subtree (size of its last layer's bias)."""
  return int(np.shape(get_path(head, head_layers(head)[-1])['bias'])[0])


# Nested-dict helpers shared with dualsig_jax.convert (plain dicts, insertion order).
def iter_leaves(tree: Mapping, prefix: tuple = ()):
  """(path, leaf) in dict insertion order (jax's flatten would sort the keys)."""
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from iter_leaves(v, prefix + (str(k),))
    else:
      yield prefix + (str(k),), v


def set_path(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


def get_path_or_empty(tree: Mapping, path: tuple) -> Mapping:
  try:
    node = get_path(tree, path)
  except (KeyError, TypeError):
    return {}
  return node if isinstance(node, Mapping) else {}


def module_order(arch: str, params: Mapping, family: str = 'cam') -> list[tuple]:
  """Paths of the param-holding modules of ``params`` in the model's call order, which
  is the torch definition order for these models (so exported keys come out in the
  order ``torch_model.state_dict()`` uses)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  # late: models/__init__ imports this module
  from dualsig_jax.models import build_model, init_input_size

  owners = []
  for path, _ in iter_leaves(params):
    if path[:-1] not in owners:
      owners.append(path[:-1])
  num_classes = head_num_classes(params['fc'])
  order: list[tuple] = []
  for lfm in (False, True):  # VGG's conv indices depend on large_feature_map
    model = build_model(arch, num_classes, family=family, large_feature_map=lfm)
    size = init_input_size(model)
    order = []

    def record(next_fun, args, kwargs, context):
      if context.method_name == '__call__':
        p = tuple(context.module.scope.path)
        if p not in order:
          order.append(p)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    if set(owners) <= set(order):
      break
  rank = {p: i for i, p in enumerate(order)}
  return sorted(owners, key=lambda p: rank.get(p, len(rank)))
