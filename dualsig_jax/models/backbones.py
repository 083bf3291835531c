"""The table of built-in backbones: ``(arch, family) -> BackboneSpec``, written out (no
registry filled at import time), and what is derived from a spec alone (the lr groups).

Adding a backbone: a model file exporting its trunk and a spec (see ``resnet.py``), one entry
per family here, its name in ``vocab.ARCHS``, and its PyTorch twin in ``bench/torch_models.py``
for the parity test.
"""

from __future__ import annotations

from dualsig_jax import vocab
from dualsig_jax.models import inception, resnet, standard, vgg
from dualsig_jax.models.spec import BackboneSpec

ARCHS = vocab.ARCHS
FAMILIES = vocab.FAMILIES

_RESNET50 = resnet.spec((3, 4, 6, 3), torchvision_file='resnet50-19c8e357.pth')
# One bottleneck per stage, 32..128 output channels: a few MFLOPs at 128 px.
_RESNET_TINY = resnet.spec((1, 1, 1, 1), (8, 16, 32, 32), stem_width=16)
_RESNET18 = resnet.spec((2, 2, 2, 2), block='basic', torchvision_file='resnet18-f37072fd.pth')
_RESNET34 = resnet.spec((3, 4, 6, 3), block='basic', torchvision_file='resnet34-b627a593.pth')

#: (arch, family) -> spec. The reference's standard ResNets are its CAM ones (same layout).
BACKBONES: dict[tuple[str, str], BackboneSpec] = {
  ('vgg16', 'cam'): vgg.cam_spec(vgg.VGG16_CFG, conv6=1024),
  ('vgg16', 'standard'): vgg.standard_spec(vgg.VGG16_CFG, hidden=4096, pool_size=7),
  ('resnet50', 'cam'): _RESNET50,
  ('resnet50', 'standard'): _RESNET50,
  ('inception_v3', 'cam'): inception.cam_spec(),
  ('inception_v3', 'standard'): standard.spec(),
  # 128-channel features; standard: a 3x3 adaptive pool (uneven bins below 9 px), hidden 64.
  ('vgg_tiny', 'cam'): vgg.cam_spec(vgg.VGG_TINY_CFG, conv6=128, torchvision=False),
  ('vgg_tiny', 'standard'): vgg.standard_spec(
    vgg.VGG_TINY_CFG, hidden=64, pool_size=3, torchvision=False
  ),
  ('resnet_tiny', 'cam'): _RESNET_TINY,
  ('resnet_tiny', 'standard'): _RESNET_TINY,
  ('resnet18', 'cam'): _RESNET18,
  ('resnet18', 'standard'): _RESNET18,
  ('resnet34', 'cam'): _RESNET34,
  ('resnet34', 'standard'): _RESNET34,
}
assert sorted(BACKBONES) == sorted((a, f) for a in ARCHS for f in FAMILIES)


def get_spec(arch: str, family: str = 'cam') -> BackboneSpec:
  """The spec of ``(arch, family)``; ``ValueError`` listing the valid names otherwise."""
  if arch not in ARCHS:
    raise ValueError(f'unknown arch {arch!r}; valid: {", ".join(ARCHS)}')
  if family not in FAMILIES:
    raise ValueError(f'unknown model family {family!r}; valid: {", ".join(FAMILIES)}')
  return BACKBONES[(arch, family)]


def head_module_name(spec: BackboneSpec, head: str) -> str:
  """PyTorch module name of the Flax head ``'fc'`` or ``'fc2'`` (e.g. ``'SPG_A4_2'``)."""
  return spec.torch_heads[('fc', 'fc2').index(head)] if head in ('fc', 'fc2') else head


def lr_group(arch: str, path: tuple[str, ...], family: str = 'cam') -> str:
  """'feature' | 'classifier' for a Flax param path, by the reference's name rules.

  ``path`` may start with the collection (``'params'``); e.g.
  ``lr_group('resnet50', ('params', 'layer4', '0', 'conv1', 'kernel')) == 'classifier'``
  and ``lr_group('resnet50', ('fc2', 'kernel')) == 'feature'`` (reference quirk:
  ``'fc.'`` does not match ``fc2.*``). main.py matches substrings of the PyTorch module path
  (standard VGG16: ``classifier.*`` / ``classifier_2.*`` -> classifier).
  """
  spec = get_spec(arch, family)
  path = tuple(str(p) for p in path)
  if path and path[0] in ('params', 'batch_stats'):
    path = path[1:]
  modules = list(path[:-1])
  if modules:
    modules[0] = head_module_name(spec, modules[0])
  name = '.'.join(modules) + '.'  # the leaf's own torch name never matters to the patterns
  other = 'classifier' if spec.lr_on_match == 'feature' else 'feature'
  return spec.lr_on_match if any(p in name for p in spec.lr_patterns) else other
