"""PyTorch state dict -> Flax variables (``torch_to_flax``) for both model families.

Accepted inputs (``torch_to_flax``), for ``family='cam'`` (the reference's ``wsol_cam/``):
- the reference's checkpoints (wsolevaluation / dual-cam): a state dict, optionally under
  ``{'state_dict': ...}`` and with ``module.`` prefixes; heads ``fc``/``fc2`` (Inception:
  ``SPG_A4``/``SPG_A4_2``, ``fc``/``fc2`` accepted too);
- torchvision ImageNet files (``vgg16-397923af.pth``, ``resnet50-19c8e357.pth``,
  ``resnet18-f37072fd.pth``, ``resnet34-b627a593.pth``, ``inception_v3_google-1a9a5a14.pth``):
  the layers the CAM models do not have are dropped (VGG ``classifier.*``; Inception
  ``Mixed_7*``, ``AuxLogits.*``, ``fc.*``; ResNet ``fc.*`` when ``num_classes != 1000``) and the
  new layers are initialised (VGG ``conv6``, Inception ``SPG_A3_*``, the heads), exactly as
  the reference's ``load_pretrained_model`` does. Which layers those are is data in each
  backbone's spec (``models.spec.TorchLayout``).
For ``family='standard'`` (the reference's ``wsol/``, used by every gradient method):
- the reference's checkpoints (VGG16 ``features.*``, ``classifier.*``, ``classifier_2.*``;
  ResNets / InceptionV3 ``fc.*``, ``fc2.*``);
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
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dualsig_jax.convert.files import normalise_state_dict
from dualsig_jax.convert.layouts import (
  detect_source,
  expected_keys,
  from_torch_layout,
  head_key,
  head_torch_name,
  renumber_features,
  torch_shape,
)
from dualsig_jax.models import build_model, clone_head, init_key
from dualsig_jax.models.backbones import get_spec
from dualsig_jax.models.heads import FC2_INITS
from dualsig_jax.models.layers import conv_kernel_init
from dualsig_jax.models.naming import FAMILIES, check_arch, check_family, set_path

__all__ = ['SOURCES', 'ConversionInfo', 'torch_to_flax', 'listing']

SOURCES = ('auto', 'reference', 'torchvision')


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


def listing(keys, limit: int = 12) -> str:
  """The first ``limit`` of ``keys`` (sorted), comma-separated, with how many more there are."""
  keys = sorted(keys)
  more = f' ... (+{len(keys) - limit} more)' if len(keys) > limit else ''
  return ', '.join(keys[:limit]) + more


# ----------------------------------------------------------------------------- torch -> flax
def _check_arguments(arch: str, family: str, source: str, fc2_init: str) -> None:
  check_arch(arch)
  check_family(family)
  if source not in SOURCES:
    raise ValueError(f'unknown source {source!r}; valid: {", ".join(SOURCES)}')
  if fc2_init not in FC2_INITS:
    raise ValueError(f'unknown fc2_init {fc2_init!r}; valid: {", ".join(FC2_INITS)}')
  if source == 'torchvision' and not get_spec(arch, family).torch_layout.torchvision_file:
    raise ValueError(f'there is no torchvision file for {arch}')


def _rename_fc_conv_heads(arch: str, family: str, sd: dict) -> tuple[dict, str]:
  """Conv heads saved under this package's names (``fc`` / ``fc2``, 4-D) -> the reference's
  (InceptionV3-CAM: ``SPG_A4`` / ``SPG_A4_2``). Returns (state dict, 'fc' | 'reference')."""
  spec = get_spec(arch, family)
  soft, sig = spec.torch_heads
  if (
    spec.head_kind != 'conv'
    or (soft, sig) == ('fc', 'fc2')
    or not any(k.startswith(('fc.', 'fc2.')) for k in sd)
    or np.ndim(sd.get('fc.weight', np.zeros((1, 1, 1, 1)))) != 4
  ):
    return sd, 'reference'
  rename = lambda m: f'{sig if m.group(1) else soft}.'
  return {re.sub(r'^fc(2?)\.', rename, k): v for k, v in sd.items()}, 'fc'


def _num_classes(arch: str, family: str, sd: dict, source: str) -> int:
  if source == 'torchvision' and family == 'cam':
    raise ValueError('num_classes is required when converting a torchvision file')
  key = head_key(arch, family)
  if key not in sd:
    raise ValueError(f'cannot infer num_classes: missing key {key!r}')
  return int(sd[key].shape[0])


def _drop(sd: dict, prefixes: tuple, info: ConversionInfo) -> list[str]:
  keys = [k for k in sd if prefixes and k.startswith(prefixes)]
  for k in keys:
    info.dropped.append(k)
    del sd[k]
  return keys


def _torchvision_prepare(arch, sd, expected, num_classes, info) -> set:
  """CAM family from torchvision's file: drop what the model lacks (and an ImageNet head of
  another size), renumber VGG convs; return the keys allowed to be missing."""
  layout = get_spec(arch, 'cam').torch_layout
  _drop(sd, layout.drop, info)
  w = sd.get(head_key(arch, 'cam'))
  if w is not None and w.shape[0] != num_classes:
    _drop(sd, (head_torch_name(arch, 'fc') + '.',), info)
  if layout.renumber_features:
    renumber_features(arch, sd, expected)
  return {k for k in expected if layout.new and k.startswith(layout.new)}


def _standard_prepare(arch, sd, expected, num_classes, source, info) -> set:
  """Standard family: skip layers the reference's model lacks (Inception's aux logits),
  renumber VGG convs, and drop a torchvision head of the wrong size (re-initialised); return
  the keys allowed to be missing."""
  layout = get_spec(arch, 'standard').torch_layout
  dropped = _drop(sd, layout.drop, info)
  for prefix in sorted({k.split('.')[0] for k in dropped}):
    info.notes.append(f'skipped {prefix}.*: the reference builds the model without them')
  if source == 'torchvision':
    info.notes.extend(layout.notes)
  if layout.renumber_features:
    renumber_features(arch, sd, expected)
  head = head_torch_name(arch, 'fc', 'standard') + '.'
  w = sd.get(head_key(arch, 'standard'))
  if source == 'torchvision' and w is not None and w.shape[0] != num_classes:
    _drop(sd, (head,), info)
    info.notes.append(f'{head}* ({w.shape[0]} classes) dropped and re-initialised')
    return {k for k in expected if k.startswith(head)}
  return set()


def _family_hint(arch, family, keys, num_classes, large_feature_map) -> str:
  """A hint when the offending keys belong to the other family's model."""
  other = next(f for f in FAMILIES if f != family)
  model = build_model(arch, num_classes, family=other, large_feature_map=large_feature_map)
  if set(keys) <= set(expected_keys(arch, model, other)):
    return f" (they fit the {other!r} family: pass family='{other}' / --family {other})"
  return ''


def _check_keys(arch, family, sd, expected, may_init, num_classes, large_feature_map) -> None:
  """Every key of ``sd`` is the model's, in its shape, and every missing one may be made."""
  unexpected = set(sd) - set(expected)
  if unexpected:
    raise ValueError(
      f'{arch} ({family}): unexpected keys in checkpoint: {listing(unexpected)}'
      + _family_hint(arch, family, unexpected, num_classes, large_feature_map)
    )
  missing = set(expected) - set(sd)
  if missing - may_init:
    raise ValueError(
      f'{arch} ({family}): missing keys in checkpoint: {listing(missing - may_init)}'
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


def _init_leaf(spec, coll: str, path: tuple, shape: tuple, key, fan_in: int) -> np.ndarray:
  """Initialise one missing leaf as the reference's model does (heads: the spec's
  ``head_init``; other convs: Kaiming), without compiling the whole model's init. ``fan_in``:
  input size of the leaf's layer (its kernel's shape without the last axis)."""
  name = path[-1]
  if coll == 'batch_stats':
    return np.zeros(shape, np.float32) if name == 'mean' else np.ones(shape, np.float32)
  if name == 'scale':
    return np.ones(shape, np.float32)
  if path[0] in ('fc', 'fc2'):
    kernel_init, bias_init = spec.head_init(fan_in)
    init = bias_init if name == 'bias' else kernel_init
    return np.asarray(init(key, shape, jnp.float32))
  if name == 'bias':
    return np.zeros(shape, np.float32)
  return np.asarray(conv_kernel_init(key, shape, jnp.float32))


def _assemble(arch, family, sd, expected, init_rng, fc2_prefix, info) -> dict:
  """The variables: every key of ``sd`` in Flax layout (copied: never aliasing the caller's
  tensors), every other leaf initialised (``fc2`` left as a zero placeholder)."""
  spec = get_spec(arch, family)
  kernels = {p[:-1]: shape for c, p, shape in expected.values() if p[-1] == 'kernel'}
  fan_in = lambda path: int(np.prod(kernels.get(path[:-1], (0,))[:-1]))
  variables: dict = {'params': {}, 'batch_stats': {}}
  for key, (coll, path, shape) in expected.items():
    if key in sd:
      arr = np.asarray(sd.pop(key), np.float32)
      value = from_torch_layout(arr, coll, path)
      if np.may_share_memory(value, arr):
        value = value.copy()
    elif key.startswith(fc2_prefix):
      value = np.zeros(shape, np.float32)  # placeholder, replaced by clone_head
    else:
      init_rng, sub = jax.random.split(init_rng)
      value = _init_leaf(spec, coll, path, shape, sub, fan_in(path))
      info.initialised.append(key)
    set_path(variables[coll], path, value)
  return variables


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
  Raises ``ValueError`` naming the key for anything that does not fit, or a NaN / Inf weight.
  """
  _check_arguments(arch, family, source, fc2_init)
  sd, counters = normalise_state_dict(state_dict)
  sd, head_names = _rename_fc_conv_heads(arch, family, sd)
  if source == 'auto':
    source = detect_source(arch, family, sd, num_classes)
  if num_classes is None:
    num_classes = _num_classes(arch, family, sd, source)
  model = build_model(arch, num_classes, family=family, large_feature_map=large_feature_map)
  expected = expected_keys(arch, model, family)
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
  _check_keys(arch, family, sd, expected, may_init, num_classes, large_feature_map)
  init_rng, fc2_rng = jax.random.split(init_key(rng))
  variables = _assemble(arch, family, sd, expected, init_rng, fc2_prefix, info)
  if fc2_missing:
    variables = clone_head(variables, mode=fc2_init, rng=fc2_rng, arch=arch, family=family)
    variables['params']['fc2'] = jax.tree_util.tree_map(np.asarray, variables['params']['fc2'])
    if fc2_init == 'init' or source == 'torchvision':
      info.initialised += [k for k in expected if k.startswith(fc2_prefix)]
  return (variables, info) if return_info else variables
