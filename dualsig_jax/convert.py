"""PyTorch <-> Flax weight conversion for both model families, and an Orbax writer.

Accepted inputs (``torch_to_flax``), for ``family='cam'`` (the reference's ``wsol_cam/``):
- the reference's checkpoints (wsolevaluation / dual-cam): a state dict, optionally under
  ``{'state_dict': ...}`` and with ``module.`` prefixes; heads ``fc``/``fc2`` (Inception:
  ``SPG_A4``/``SPG_A4_2``, ``fc``/``fc2`` accepted too);
- torchvision ImageNet files (``vgg16-397923af.pth``, ``resnet50-19c8e357.pth``,
  ``inception_v3_google-1a9a5a14.pth``): the layers the CAM models do not have are dropped
  (VGG ``classifier.*``; Inception ``Mixed_7*``, ``AuxLogits.*``, ``fc.*``; ResNet ``fc.*``
  when ``num_classes != 1000``) and the new layers are initialised (VGG ``conv6``, Inception
  ``SPG_A3_*``, the heads), exactly as the reference's ``load_pretrained_model`` does.
For ``family='standard'`` (the reference's ``wsol/``, used by every gradient method):
- the reference's checkpoints (VGG16 ``features.*``, ``classifier.*``, ``classifier_2.*``;
  ResNet50 / InceptionV3 ``fc.*``, ``fc2.*``);
- the same torchvision files read as vanilla checkpoints: the softmax head is torchvision's
  ``classifier`` MLP / ``fc`` and ``num_classes`` comes from the file (1000). With another
  ``num_classes`` that head is dropped and freshly initialised, as the reference does for
  datasets other than ILSVRC. Inception's ``AuxLogits.*`` are skipped (the reference builds
  Inception3 without them; noted in the info). VGG16's conv indices follow the model
  (``large_feature_map`` removes a pool and shifts them).
In both families a missing sigmoid head (``fc2`` / ``SPG_A4_2`` / ``classifier_2``) is freshly
initialised as the reference does (``fc2_init='init'``, the default) or cloned from the
softmax head (``'clone'``); the trainer may replace it again. ``return_info=True`` reports
which keys were dropped and initialised. Anything else that does not fit (missing/unexpected
keys, shapes) is an error naming the key. BatchNorm ``num_batches_tracked`` counters are not
weights (unused with a set momentum); they are reported in the info and re-emitted by
``flax_to_torch``.

CLI: ``python -m dualsig_jax.convert --arch resnet50 [--family standard] --torch_checkpoint
FILE --num_classes N --output DIR`` writes ``DIR/variables`` (Orbax) and ``DIR/conversion.json``
(arch, family, num_classes, large_feature_map, ...); read them back with :func:`load_variables`
and :func:`read_checkpoint_info`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dualsig_jax.convert_io import (
  BN_COUNTER,
  check_target,
  load_meta,
  load_state_dict,
  load_variables,
  normalise_state_dict,
  read_checkpoint_info,
  save_variables,
)
from dualsig_jax.models import build_model, clone_head, init_input_size, init_key
from dualsig_jax.models.layers import conv_kernel_init, head_inits
from dualsig_jax.models.naming import (
  FAMILIES,
  arch_kind,
  check_arch,
  check_family,
  from_torch_layout,
  get_path,
  get_path_or_empty,
  head_torch_name,
  iter_leaves,
  module_order,
  set_path,
  to_torch_layout,
  torch_key,
  torch_shape,
)

__all__ = [
  'SOURCES',
  'ConversionInfo',
  'torch_to_flax',
  'flax_to_torch',
  'load_state_dict',
  'save_variables',
  'load_variables',
  'load_meta',
  'read_checkpoint_info',
  'main',
]

SOURCES = ('auto', 'reference', 'torchvision')
_TINY = ('vgg_tiny', 'resnet_tiny')


@dataclasses.dataclass
class ConversionInfo:
  """What ``torch_to_flax`` did besides a one-to-one copy."""

  arch: str
  source: str  # 'reference' | 'torchvision'
  num_classes: int
  large_feature_map: bool
  family: str = 'cam'  # 'cam' | 'standard'
  dropped: list[str] = dataclasses.field(default_factory=list)  # ignored input keys
  initialised: list[str] = dataclasses.field(default_factory=list)  # torch keys set by init
  fc2: str = 'loaded'  # 'loaded' | 'clone' | 'init'
  head_names: str = 'reference'  # Inception-CAM input used 'SPG_A4' ('reference') or 'fc'
  num_batches_tracked: dict[str, int] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)  # what a user should know

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- tree helpers
def _expected(arch: str, model, family: str) -> dict[str, tuple[str, tuple, tuple]]:
  """torch key -> (collection, flax path, flax shape) for ``model``'s variables."""
  size = init_input_size(model)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  )
  out = {}
  for coll in ('params', 'batch_stats'):
    for path, leaf in iter_leaves(shapes.get(coll, {})):
      out[torch_key(arch, coll, path, family)] = (coll, path, tuple(leaf.shape))
  return out


def _listing(keys, limit: int = 12) -> str:
  keys = sorted(keys)
  more = f' ... (+{len(keys) - limit} more)' if len(keys) > limit else ''
  return ', '.join(keys[:limit]) + more


# ----------------------------------------------------------------------------- torch -> flax
def _head_key(arch: str, family: str) -> str:
  """Key of the softmax head's output weight (its rows are the classes)."""
  name = head_torch_name(arch, 'fc', family)
  return (
    f'{name}.6.weight' if (arch_kind(arch), family) == ('vgg', 'standard') else f'{name}.weight'
  )


def _detect_source(arch: str, family: str, sd: dict, num_classes: int | None) -> str:
  kind = arch_kind(arch)
  if arch in _TINY:
    return 'reference'
  if family == 'standard':
    # Same layout as the reference's wsol/ models: an ImageNet head without a sigmoid head
    # (or Inception's aux logits) marks torchvision's file.
    w = sd.get(_head_key(arch, family))
    fc2 = head_torch_name(arch, 'fc2', family) + '.'
    tv = any(k.startswith('AuxLogits.') for k in sd) or (
      w is not None and w.shape[0] == 1000 and not any(k.startswith(fc2) for k in sd)
    )
  elif kind == 'vgg':
    tv = any(k.startswith('classifier.') for k in sd) or 'conv6.weight' not in sd
  elif kind == 'inception':
    tv = any(k.startswith(('Mixed_7', 'AuxLogits.')) for k in sd) or (
      'fc.weight' in sd and sd['fc.weight'].ndim == 2
    )
  else:  # resnet: same layout; only an ImageNet head that does not fit tells them apart
    w = sd.get('fc.weight')
    tv = (
      'fc2.weight' not in sd
      and w is not None
      and w.shape[0] == 1000
      and num_classes not in (None, 1000)
    )
  return 'torchvision' if tv else 'reference'


def _init_leaf(
  arch: str, family: str, coll: str, path: tuple, shape: tuple, key, fan_in: int
) -> np.ndarray:
  """Initialise one missing leaf as the reference's model does (heads: ``head_inits``;
  other convs: Kaiming), without compiling the whole model's init. ``fan_in``: input size
  of the leaf's layer (its kernel's shape without the last axis)."""
  name = path[-1]
  if coll == 'batch_stats':
    return np.zeros(shape, np.float32) if name == 'mean' else np.ones(shape, np.float32)
  if name == 'scale':
    return np.ones(shape, np.float32)
  if path[0] in ('fc', 'fc2'):
    kernel_init, bias_init = head_inits(arch_kind(arch), family, fan_in)
    init = bias_init if name == 'bias' else kernel_init
    return np.asarray(init(key, shape, jnp.float32))
  if name == 'bias':
    return np.zeros(shape, np.float32)
  return np.asarray(conv_kernel_init(key, shape, jnp.float32))


def _renumber_vgg_convs(arch: str, sd: dict, expected: dict) -> None:
  """wsolevaluation's adjust_pretrained_model: the model may have fewer pools than the file,
  so conv indices shift; match the file's convs to the model's by order (in place)."""
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


def _drop(sd: dict, prefixes: tuple, info: ConversionInfo) -> list[str]:
  keys = [k for k in sd if k.startswith(prefixes)]
  for k in keys:
    info.dropped.append(k)
    del sd[k]
  return keys


def _torchvision_prepare(arch, sd, expected, num_classes, info):
  """Drop what the CAM model lacks, renumber VGG convs; return keys allowed to be missing."""
  kind = arch_kind(arch)
  drop = {
    'vgg': ('classifier.',),
    'inception': ('Mixed_7', 'AuxLogits.', 'fc.', 'fc2.'),
    'resnet': (),
  }[kind]
  if kind == 'resnet' and 'fc.weight' in sd and sd['fc.weight'].shape[0] != num_classes:
    drop = ('fc.',)
  _drop(sd, drop, info)
  if kind == 'vgg':
    _renumber_vgg_convs(arch, sd, expected)
  new = {
    'vgg': ('conv6.', 'fc.', 'fc2.'),
    'resnet': ('fc.', 'fc2.'),
    'inception': ('SPG_A3_1b.', 'SPG_A3_2b.', 'SPG_A4.', 'SPG_A4_2.'),
  }[kind]
  return {k for k in expected if k.startswith(new)}


def _standard_prepare(arch, sd, expected, num_classes, source, info):
  """Standard family: skip Inception's aux logits, renumber VGG convs, and drop a torchvision
  head of the wrong size (re-initialised); return the keys allowed to be missing."""
  kind = arch_kind(arch)
  if _drop(sd, ('AuxLogits.',), info):
    info.notes.append('skipped AuxLogits.*: the reference builds Inception3 without aux logits')
  if source == 'torchvision' and kind == 'inception':
    info.notes.append(
      'torchvision trained these weights with transform_input=True; the reference (and this '
      'model) use transform_input=False with ImageNet mean/std inputs'
    )
  if kind == 'vgg':
    _renumber_vgg_convs(arch, sd, expected)
  head = head_torch_name(arch, 'fc', 'standard') + '.'
  w = sd.get(_head_key(arch, 'standard'))
  if source == 'torchvision' and w is not None and w.shape[0] != num_classes:
    _drop(sd, (head,), info)
    info.notes.append(f'{head}* ({w.shape[0]} classes) dropped and re-initialised')
    return {k for k in expected if k.startswith(head)}
  return set()


def _family_hint(arch, family, keys, num_classes, large_feature_map) -> str:
  """A hint when the offending keys belong to the other family's model."""
  other = next(f for f in FAMILIES if f != family)
  model = build_model(arch, num_classes, family=other, large_feature_map=large_feature_map)
  if set(keys) <= set(_expected(arch, model, other)):
    return f" (they fit the {other!r} family: pass family='{other}' / --family {other})"
  return ''


def torch_to_flax(
  state_dict: Mapping,
  arch: str,
  *,
  family: str = 'cam',
  num_classes: int | None = None,
  large_feature_map: bool = False,
  source: str = 'auto',
  fc2_init: str = 'init',
  rng: int | jax.Array = 0,
  return_info: bool = False,
):
  """Convert a torch state dict to ``{'params': ..., 'batch_stats': ...}`` (numpy float32).

  ``family``: 'cam' | 'standard' (the model family the weights are for; see module doc).
  ``num_classes`` defaults to the checkpoint head's size (required for torchvision files in
  the CAM family, whose models drop that head). ``source``: 'auto' | 'reference' |
  'torchvision'. ``fc2_init``: how a missing sigmoid head is made, 'init' (the reference's
  fresh init, from ``rng``) or 'clone' (a copy of the softmax head).
  Returns ``variables`` or ``(variables, ConversionInfo)`` with ``return_info=True``.
  """
  check_arch(arch)
  check_family(family)
  if source not in SOURCES:
    raise ValueError(f'unknown source {source!r}; valid: {", ".join(SOURCES)}')
  if fc2_init not in ('clone', 'init'):
    raise ValueError(f'unknown fc2_init {fc2_init!r}; valid: clone, init')
  if source == 'torchvision' and arch in _TINY:
    raise ValueError(f'there is no torchvision file for {arch}')
  sd, counters = normalise_state_dict(state_dict)
  kind = arch_kind(arch)
  head_names = 'reference'
  if (
    (kind, family) == ('inception', 'cam')
    and any(k.startswith(('fc.', 'fc2.')) for k in sd)
    and (sd.get('fc.weight', np.zeros((1, 1, 1, 1))).ndim == 4)
  ):
    head_names = 'fc'  # our own naming of the 1x1 conv heads
    sd = {
      re.sub(r'^fc(2?)\.', lambda m: f'SPG_A4{"_2" if m.group(1) else ""}.', k): v
      for k, v in sd.items()
    }
  if source == 'auto':
    source = _detect_source(arch, family, sd, num_classes)
  if num_classes is None:
    if source == 'torchvision' and family == 'cam':
      raise ValueError('num_classes is required when converting a torchvision file')
    head_key = _head_key(arch, family)
    if head_key not in sd:
      raise ValueError(f'cannot infer num_classes: missing key {head_key!r}')
    num_classes = int(sd[head_key].shape[0])
  model = build_model(arch, num_classes, family=family, large_feature_map=large_feature_map)
  expected = _expected(arch, model, family)
  info = ConversionInfo(
    arch,
    source,
    int(num_classes),
    bool(large_feature_map),
    family=family,
    head_names=head_names,
    num_batches_tracked=counters,
  )
  may_init = set()
  if family == 'standard':
    may_init = _standard_prepare(arch, sd, expected, num_classes, source, info)
  elif source == 'torchvision':
    may_init = _torchvision_prepare(arch, sd, expected, num_classes, info)
  fc2_prefix = head_torch_name(arch, 'fc2', family) + '.'
  fc2_missing = not any(k.startswith(fc2_prefix) for k in sd)
  if fc2_missing:
    may_init |= {k for k in expected if k.startswith(fc2_prefix)}
    info.fc2 = fc2_init

  unexpected = set(sd) - set(expected)
  if unexpected:
    raise ValueError(
      f'{arch} ({family}): unexpected keys in checkpoint: {_listing(unexpected)}'
      + _family_hint(arch, family, unexpected, num_classes, large_feature_map)
    )
  missing = set(expected) - set(sd)
  if missing - may_init:
    raise ValueError(
      f'{arch} ({family}): missing keys in checkpoint: {_listing(missing - may_init)}'
    )
  for key, arr in sd.items():
    coll, path, shape = expected[key]
    want = torch_shape(shape, coll, path)
    if tuple(arr.shape) != want:
      raise ValueError(
        f'{arch} ({family}): shape mismatch for {key!r}: checkpoint {tuple(arr.shape)}, '
        f'model expects {want} (num_classes={num_classes}, '
        f'large_feature_map={large_feature_map})'
      )

  init_rng, fc2_rng = jax.random.split(init_key(rng))
  kernels = {p[:-1]: shape for c, p, shape in expected.values() if p[-1] == 'kernel'}
  fan_in = lambda path: int(np.prod(kernels.get(path[:-1], (0,))[:-1]))
  variables: dict = {'params': {}, 'batch_stats': {}}
  for key, (coll, path, shape) in expected.items():
    if key in sd:
      arr = np.asarray(sd.pop(key), np.float32)
      value = from_torch_layout(arr, coll, path)
      if np.may_share_memory(value, arr):  # never alias the caller's tensors
        value = value.copy()
    elif key.startswith(fc2_prefix):
      value = np.zeros(shape, np.float32)  # placeholder, replaced by clone_head below
    else:
      init_rng, sub = jax.random.split(init_rng)
      value = _init_leaf(arch, family, coll, path, shape, sub, fan_in(path))
      info.initialised.append(key)
    set_path(variables[coll], path, value)
  if fc2_missing:
    variables = clone_head(variables, mode=fc2_init, rng=fc2_rng, arch=arch, family=family)
    variables['params']['fc2'] = jax.tree_util.tree_map(np.asarray, variables['params']['fc2'])
    if fc2_init == 'init' or source == 'torchvision':
      info.initialised += [k for k in expected if k.startswith(fc2_prefix)]
  return (variables, info) if return_info else variables


# ----------------------------------------------------------------------------- flax -> torch


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
      cam_inception = (arch_kind(arch), family) == ('inception', 'cam')
      if head_names == 'fc' and cam_inception and module[0] in ('fc', 'fc2'):
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


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--arch', required=True)
  p.add_argument('--family', default='cam', choices=FAMILIES)
  p.add_argument('--torch_checkpoint', required=True)
  p.add_argument('--num_classes', type=int, default=None)
  p.add_argument('--output', required=True)
  p.add_argument('--large_feature_map', action='store_true')
  p.add_argument('--source', default='auto', choices=SOURCES)
  p.add_argument('--fc2_init', default='init', choices=('init', 'clone'))
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--overwrite', action='store_true')
  a = p.parse_args(argv)
  check_target(a.output, a.overwrite)  # before the (slow) conversion
  sd = load_state_dict(a.torch_checkpoint)
  variables, info = torch_to_flax(
    sd,
    a.arch,
    family=a.family,
    num_classes=a.num_classes,
    large_feature_map=a.large_feature_map,
    source=a.source,
    fc2_init=a.fc2_init,
    rng=a.seed,
    return_info=True,
  )
  meta = info.to_json() | {'torch_checkpoint': os.path.abspath(a.torch_checkpoint)}
  save_variables(variables, a.output, meta=meta, overwrite=a.overwrite)
  print(
    f'{a.arch} ({a.family} family, {info.source} layout, {info.num_classes} classes, '
    f'large_feature_map={info.large_feature_map}) -> {a.output}'
  )
  if info.dropped:
    print(f'dropped {len(info.dropped)} keys: {_listing(info.dropped)}')
  if info.initialised:
    print(f'initialised {len(info.initialised)} keys: {_listing(info.initialised)}')
  for note in info.notes:
    print(f'note: {note}')
  print(f'fc2: {info.fc2}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
