"""Names of the Flax variable trees: the arch / family / branch name checks and nested-dict
helpers shared with the converter. (PyTorch key names live with the converter, in
``dualsig_jax.convert.layouts``; the lr rules in ``models.backbones``.)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dualsig_jax import vocab

ARCHS = vocab.ARCHS
# 'cam': the reference's wsol_cam/ models (method cam); 'standard': its wsol/ models, which
# every gradient method (Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM) uses.
FAMILIES = vocab.FAMILIES

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
