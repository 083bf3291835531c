"""Where split metadata lives: the copy shipped with the package, or a user's folder.

Light on purpose (os and importlib only): the entry points' preflight check reads it before
JAX or grain are imported.
"""

from __future__ import annotations

import importlib.util
import os


def _shipped_root() -> str:
  # The wsolevaluation metadata is package data of `dualsig_jax.metadata` (pyproject maps the
  # repository's top-level metadata/ folder there), so it is found after `pip install .` and
  # from any working directory; a source checkout without an install falls back to the folder.
  spec = importlib.util.find_spec('dualsig_jax.metadata')
  if spec is not None and spec.submodule_search_locations:
    for loc in spec.submodule_search_locations:
      if os.path.isdir(os.path.join(loc, 'CUB')):
        return loc
  return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), 'metadata')


SHIPPED_METADATA = _shipped_root()
# Config values that name the shipped copy.
SHIPPED_NAMES = ('', 'metadata')


def split_metadata_dir(input_cfg, split: str) -> str:
  """`<metadata root>/<dataset>/<split>` for `config.input`.

  `input.metadata_root` 'metadata' (or '') is the shipped copy; SYNTH defaults to
  `<data_root>/metadata`. A user folder that lacks a split falls back to the shipped copy of
  that split, so `make_metadata --out MY --split train` for ILSVRC plus the shipped test split
  work with `metadata_root=MY`.
  """
  name = input_cfg.dataset_name
  root = input_cfg.metadata_root or ''
  if name == 'SYNTH' and root in SHIPPED_NAMES:
    return os.path.join(input_cfg.data_root, 'metadata', name, split)
  if root in SHIPPED_NAMES:
    return os.path.join(SHIPPED_METADATA, name, split)
  mine = os.path.join(root, name, split)
  shipped = os.path.join(SHIPPED_METADATA, name, split)
  if not os.path.isdir(mine) and os.path.isdir(shipped):
    return shipped
  return mine
