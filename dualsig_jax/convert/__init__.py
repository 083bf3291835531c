"""PyTorch <-> Flax weight conversion for both model families, and the files it reads and writes.

- :mod:`~dualsig_jax.convert.to_flax`: ``torch_to_flax`` (a torch state dict -> Flax variables,
  for the reference's and torchvision's files) and its :class:`ConversionInfo`;
- :mod:`~dualsig_jax.convert.layouts`: torch names and layouts of the Flax variables, and
  ``flax_to_torch``;
- :mod:`~dualsig_jax.convert.files`: reading torch files (``load_state_dict``), writing and
  reading converted checkpoints (``save_variables``, ``load_variables``,
  ``read_checkpoint_info``);
- :mod:`~dualsig_jax.convert.integrity`: what makes a file trusted (the archive's CRCs, the
  output's checksum manifest, finite weights);
- :mod:`~dualsig_jax.convert.command`: the command line, ``python -m dualsig_jax.convert --arch
  resnet50 [--family standard] --torch_checkpoint FILE --num_classes N --output DIR``, which
  writes ``DIR/variables`` (Orbax), ``DIR/conversion.json`` (arch, family, num_classes,
  large_feature_map, ...) and ``DIR/checksums.json``. A user error is one line, exit 2.
"""

from dualsig_jax.convert.command import cli, main
from dualsig_jax.convert.files import (
  load_meta,
  load_state_dict,
  load_variables,
  read_checkpoint_info,
  save_variables,
)
from dualsig_jax.convert.layouts import flax_to_torch
from dualsig_jax.convert.to_flax import SOURCES, ConversionInfo, torch_to_flax

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
  'cli',
]
