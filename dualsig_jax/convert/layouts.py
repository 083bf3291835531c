"""PyTorch names and layouts of the Flax variables, for the converter, and ``flax_to_torch``.

Flax module names mirror the torch module tree (``layer1/0/conv1``), so a key is the module
path joined by dots plus the torch tensor name. The only renames: Flax's leaf names
(``kernel``/``scale``/``mean``/``var``) and the top-level heads, which are always ``fc``
(softmax) and ``fc2`` (sigmoid) in Flax and whatever the backbone's spec says in torch
(``torch_heads``: InceptionV3-CAM ``SPG_A4`` / ``SPG_A4_2``, the standard VGG16
``classifier`` / ``classifier_2``). What a backbone's files look like (torchvision's extra and
missing layers) is data in its spec (``models.spec.TorchLayout``); the code reading it is here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from dualsig_jax.models.backbones import get_spec, head_module_name
from dualsig_jax.models.naming import (
  check_arch,
  check_family,
  get_path,
  get_path_or_empty,
  head_num_classes,
  iter_leaves,
)

# Suffix of a BatchNorm's step counter in torch state dicts (not a weight).
BN_COUNTER = '.num_batches_tracked'

_LEAF_TO_TORCH = {
  ('params', 'kernel'): 'weight',
  ('params', 'scale'): 'weight',
  ('params', 'bias'): 'bias',
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}


def head_torch_name(arch: str, head: str, family: str = 'cam') -> str:
  """Torch module name of the Flax head ``'fc'`` or ``'fc2'``."""
  return head_module_name(get_spec(arch, family), head)


def head_key(arch: str, family: str = 'cam') -> str:
  """Key of the softmax head's output weight (its rows are the classes)."""
  out = get_spec(arch, family).torch_layout.head_out
  return f'{head_torch_name(arch, "fc", family)}.{out + "." if out else ""}weight'


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


def expected_keys(arch: str, model, family: str) -> dict[str, tuple[str, tuple, tuple]]:
  """torch key -> (collection, flax path, flax shape) for ``model``'s variables."""
  import jax
  import jax.numpy as jnp

  from dualsig_jax.models import init_input_size

  size = init_input_size(model)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  )
  out = {}
  for coll in ('params', 'batch_stats'):
    for path, leaf in iter_leaves(shapes.get(coll, {})):
      out[torch_key(arch, coll, path, family)] = (coll, path, tuple(leaf.shape))
  return out


def renumber_features(arch: str, sd: dict, expected: Mapping) -> None:
  """wsolevaluation's adjust_pretrained_model: the model may have fewer pools than the file,
  so VGG's conv indices shift; match the file's convs to the model's by order (in place)."""
  idx = lambda keys: sorted({int(k.split('.')[1]) for k in keys if re.match(r'features\.\d+\.', k)})
  src, dst = idx(sd), idx(expected)
  if len(src) != len(dst):
    raise ValueError(f'{arch}: checkpoint has {len(src)} feature convs, the model has {len(dst)}')
  sd_new = {k: v for k, v in sd.items() if not k.startswith('features.')}
  for s, d in zip(src, dst):
    for leaf in ('weight', 'bias'):
      if f'features.{s}.{leaf}' in sd:
        sd_new[f'features.{d}.{leaf}'] = sd[f'features.{s}.{leaf}']
  sd.clear()
  sd.update(sd_new)


def detect_source(arch: str, family: str, sd: Mapping, num_classes: int | None) -> str:
  """'torchvision' | 'reference': which file layout ``sd`` has (see ``TorchLayout``)."""
  layout = get_spec(arch, family).torch_layout
  if not layout.torchvision_file:
    return 'reference'
  w = sd.get(head_key(arch, family))
  fc2 = head_torch_name(arch, 'fc2', family) + '.'
  imagenet_head = w is not None and w.shape[0] == 1000 and not any(k.startswith(fc2) for k in sd)
  extra = bool(layout.drop) and any(k.startswith(layout.drop) for k in sd)
  if family == 'standard':
    # Same layout as the reference's wsol/ models: an ImageNet head without a sigmoid head
    # (or layers only torchvision has) marks torchvision's file.
    return 'torchvision' if extra or imagenet_head else 'reference'
  heads = (head_torch_name(arch, 'fc', family) + '.', fc2)
  trunk_new = tuple(p for p in layout.new if p not in heads)
  lacks_new = bool(trunk_new) and not any(k.startswith(trunk_new) for k in sd)
  # ResNets: the same layout; only an ImageNet head that does not fit tells them apart.
  tv = extra or lacks_new or (imagenet_head and num_classes not in (None, 1000))
  return 'torchvision' if tv else 'reference'


def module_order(arch: str, params: Mapping, family: str = 'cam') -> list[tuple]:
  """Paths of the param-holding modules of ``params`` in the model's call order, which
  is the torch definition order for these models (so exported keys come out in the
  order ``torch_model.state_dict()`` uses)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

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


def flax_to_torch(
  variables: Mapping,
  arch: str,
  *,
  family: str = 'cam',
  head_names: str = 'reference',
  num_batches_tracked: int | Mapping[str, int] | None = 0,
  as_numpy: bool = False,
) -> dict:
  """Variables -> torch state dict (reference key names and shapes, float32).

  ``family``: 'cam' | 'standard' (standard VGG16 heads come out as ``classifier.*`` /
  ``classifier_2.*``). ``head_names``: InceptionV3-CAM heads as 'reference'
  (``SPG_A4``/``SPG_A4_2``) or 'fc'.
  ``num_batches_tracked``: value for every BatchNorm's counter (int), per-key values (e.g.
  ``ConversionInfo.num_batches_tracked``; absent keys get 0), or None to omit them.
  Returns torch tensors (needs torch) or numpy arrays with ``as_numpy=True``.
  """
  check_arch(arch)
  check_family(family)
  if head_names not in ('reference', 'fc'):
    raise ValueError(f'unknown head_names {head_names!r}; valid: reference, fc')
  params, stats = variables['params'], variables.get('batch_stats', {}) or {}
  conv_heads = get_spec(arch, family).head_kind == 'conv'  # InceptionV3-CAM's SPG_A4 / _2
  out: dict[str, np.ndarray] = {}
  for module in module_order(arch, params, family):
    leaves = get_path(params, module)
    mstats = get_path_or_empty(stats, module)
    # torch order inside a module: weight, bias, running stats, counter.
    for name in ('kernel', 'scale', 'bias'):
      if name not in leaves:
        continue
      path = module + (name,)
      key = torch_key(arch, 'params', path, family)
      if head_names == 'fc' and conv_heads and module[0] in ('fc', 'fc2'):
        key = module[0] + '.' + key.rsplit('.', 1)[1]
      out[key] = to_torch_layout(np.asarray(leaves[name]), 'params', path)
    if 'mean' in mstats:
      prefix = torch_key(arch, 'batch_stats', module + ('mean',), family)
      prefix = prefix[: -len('.running_mean')]
      out[prefix + '.running_mean'] = np.asarray(mstats['mean'])
      out[prefix + '.running_var'] = np.asarray(mstats['var'])
      if num_batches_tracked is not None:
        n = (
          num_batches_tracked.get(prefix + BN_COUNTER, 0)
          if isinstance(num_batches_tracked, Mapping)
          else num_batches_tracked
        )
        out[prefix + BN_COUNTER] = np.array(n, dtype=np.int64)
  if as_numpy:
    return out
  try:
    import torch
  except ImportError as e:
    raise ImportError('flax_to_torch(as_numpy=False) needs torch; pass as_numpy=True') from e
  return {k: torch.from_numpy(np.array(v)) for k, v in out.items()}  # keeps 0-d shape
